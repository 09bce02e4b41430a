"""Where images come from: labelled folders and tars, splits and transforms (``folders``), wild pools and
their selection (``wild``), and the training data sources the pipeline draws from."""
from vitshrink.data.folders import (BUNDLED_TRAIN, BUNDLED_VAL, ImageSplit, LabelledData, SkippingCollate,
                                    build_transform, make_loader, reader_targets, resolve_data, resolve_eval_split,
                                    sample_images, stratified_holdout)

__all__ = ["BUNDLED_TRAIN", "BUNDLED_VAL", "ImageSplit", "LabelledData", "SkippingCollate", "build_transform",
           "make_loader", "reader_targets", "resolve_data", "resolve_eval_split", "sample_images", "stratified_holdout"]
