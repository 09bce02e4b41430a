"""Model classes vitshrink adds to timm's registry (importing this module registers them)."""
from vitshrink.models import cifar_resnet  # noqa: F401  (registers cifar_resnet20/32/44/56)
from vitshrink.models import blockwise_vit  # noqa: F401  (registers vitshrink_vit)
