"""The cost model: the GPU catalog and model shapes, time/VRAM/dollar estimates,
billing rules, and placement (which offer to rent)."""
