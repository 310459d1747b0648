"""NoteLLM Platform core library: data contract, models, losses, index and services.

Importing ``notellm`` sets ``HF_HUB_OFFLINE=1``: nothing is ever downloaded from a model hub.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

__version__ = "0.1.0"
