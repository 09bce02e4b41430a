"""vitshrink: make a Vision Transformer smaller and faster by knowledge distillation, then prove it."""
__version__ = "0.1.0"

from vitshrink.guard import go_offline as _go_offline

_go_offline()  # before any Hugging Face library reads its settings: vitshrink never downloads
