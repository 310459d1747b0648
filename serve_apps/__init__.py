"""Ray Serve applications (embedding, retrieval, tag generation) and their deploy config.

Empty until the serving issue lands; the layout is fixed by the product design.
"""
