"""Reading and writing models: SPECs (timm names, safetensors with the architecture record, ``.pt`` weights-only,
Hugging Face directories, foreign layouts) and the architecture record.

Modules: ``record`` (the ``ModelRecord`` every model carries, building and saving), ``spec`` (SPEC dispatch),
``readers`` (file readers), ``foreign`` (timm kwargs from foreign state dicts), ``hf`` (Hugging Face
directories), ``weights`` (checking and loading a state dict), ``fields`` (type/range checks of file fields).
"""
from vitshrink.io.record import (METADATA_KEY, ModelRecord, architecture_record, attach_record, create_model,
                                 data_config, model_from_record, record_of, save_model, set_data_config)
from vitshrink.io.spec import load_model

__all__ = ["METADATA_KEY", "ModelRecord", "architecture_record", "attach_record", "create_model", "data_config",
           "load_model", "model_from_record", "record_of", "save_model", "set_data_config"]
