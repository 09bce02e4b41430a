"""Model classes vitshrink adds to timm's registry (importing this module registers them)."""
from vitshrink.models import cifar_resnet  # noqa: F401  (registers cifar_resnet20/32/44/56)
from vitshrink.models import blockwise_vit  # noqa: F401  (registers vitshrink_vit)
from vitshrink.models import involution  # noqa: F401  (registers rednet26/38/50/101/152 and rednet_cifar26)
from vitshrink.models import cit  # noqa: F401  (registers cit_tiny/small/base_patch16_224, cit_tiny_patch4_32, vitshrink_cit)
from vitshrink.models import distilled_vit  # noqa: F401  (registers vitshrink_vit_distilled)
