"""Reading and writing models: SPECs (timm names, safetensors with the architecture record, ``.pt`` weights-only,
Hugging Face directories, foreign layouts) and the architecture record."""
from vitshrink.io.loading import (METADATA_KEY, architecture_record, create_model, data_config, load_model,
                                  model_from_record, save_model, set_data_config)

__all__ = ["METADATA_KEY", "architecture_record", "create_model", "data_config", "load_model", "model_from_record",
           "save_model", "set_data_config"]
