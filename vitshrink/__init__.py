"""vitshrink: make a Vision Transformer smaller and faster by knowledge distillation, then prove it."""
__version__ = "0.1.0"
