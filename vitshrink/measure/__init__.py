"""Params, MACs/FLOPs (attention included) and latency/throughput on onnxruntime and torch.

``counting`` counts (see its docstring for the MAC convention), ``latency`` times, ``bench`` puts both into
the ``benchmark`` / ``compare`` dicts. Imports go one way: measure -> export -> runtime.
"""
from vitshrink.measure.bench import RUNTIMES, benchmark, compare
from vitshrink.measure.counting import FlopCount, count_flops, count_onnx_macs, count_onnx_params, count_params
from vitshrink.measure.latency import LatencyStats, interleaved_p50, ort_latency, time_calls, torch_latency
from vitshrink.runtime import eval_mode, model_device, ort_providers, ort_session, resolve_input_size

__all__ = ["RUNTIMES", "benchmark", "compare", "FlopCount", "count_flops", "count_onnx_macs", "count_onnx_params",
           "count_params", "LatencyStats", "interleaved_p50", "ort_latency", "time_calls", "torch_latency",
           "eval_mode", "model_device",
           "ort_providers", "ort_session", "resolve_input_size"]
