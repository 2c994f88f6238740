"""Finding the MoE routers of a Transformers model, patching them to STAR routers, and folding back."""
