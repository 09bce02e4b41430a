"""The stages of a run after training: ``student.onnx`` (parity-checked), top-1, the teacher/student
measurements, and report.json / report.md. Called by ``vitshrink.pipeline`` (and ``supervised``)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from vitshrink.data import LabelledData, make_loader
from vitshrink.data.folders import readable_images
from vitshrink.data.sources import eval_transform, with_transform
from vitshrink.io import data_config

if TYPE_CHECKING:
    from vitshrink.pipeline import Run
    from vitshrink.train import TrainResult


def export_student(run: Run, final: nn.Module, labelled: LabelledData):
    """``student.onnx``, parity-checked on real validation images."""
    from vitshrink.export import export_onnx

    # Without a validation split (data-free, no --val-data) the parity check uses training images.
    split = labelled.val if labelled.val is not None else labelled.train
    sample = readable_images(split, eval_transform(final), 8)  # past unreadable first images
    what = "synthesised" if labelled.synthetic else "real"
    run.log(f"exporting student.onnx (parity check on {what} images) and measuring teacher and student ...")
    return export_onnx(final, run.out_dir / "student.onnx", sample=sample)


def top1_on(run: Run, model: nn.Module, labelled: LabelledData) -> float | None:
    """Top-1 on the validation split; None when there is none (nothing labelled to measure on)."""
    from vitshrink.evaluation import evaluate_loader

    if labelled.val is None:
        return None
    val = with_transform(labelled.val, eval_transform(model))
    loader = make_loader(val, run.cfg["eval_batch_size"], workers=run.cfg["workers"])
    result = evaluate_loader(model, loader, device=run.device, amp=run.amp, progress=run.progress,
                             description="evaluate")
    if run.progress is not None:
        run.progress.remove_task(run.progress.task_ids[-1])
    return result.top1


def measure_models(run: Run, teacher: nn.Module, final: nn.Module, labelled: LabelledData) -> dict[str, Any]:
    """Top-1 of teacher and student, ORT latency, params and MACs (the student timed as shipped, student.onnx)."""
    from vitshrink.measure import benchmark, count_flops, count_params

    teacher_top1 = top1_on(run, teacher, labelled)
    student_top1 = top1_on(run, final.to(run.device), labelled)
    final = final.cpu()
    sizes = tuple(int(b) for b in run.cfg["bench_batch_sizes"])
    teacher_bench = benchmark(teacher.cpu(), batch_sizes=sizes, runtimes=("onnxruntime",), min_time_s=0.5)
    # Params and MACs are counted on the torch model, the same way as the teacher's.
    student_bench = benchmark(run.out_dir / "student.onnx", batch_sizes=sizes, min_time_s=0.5, name="student.onnx",
                              input_size=data_config(final)["input_size"])
    flops = count_flops(final, data_config(final)["input_size"])
    student_bench.update(params=count_params(final), macs=flops.macs, flops=flops.flops, gmacs=flops.gmacs,
                         gflops=flops.gflops, flops_note=teacher_bench["flops_note"])
    return {"sizes": sizes, "teacher_top1": teacher_top1, "student_top1": student_top1,
            "teacher_bench": teacher_bench, "student_bench": student_bench}


def write_run_report(run: Run, labelled: LabelledData, trained: TrainResult, onnx, measured: dict[str, Any]
                     ) -> dict[str, Any]:
    """report.json and report.md from the measured numbers."""
    from vitshrink.data.logit_cache import cache_notes, cache_record
    from vitshrink.report import build_report, model_entry, write_report

    sizes = measured["sizes"]
    report = build_report(
        recipe=run.recipe.name, data=labelled.description, epochs=run.cfg["epochs"], best_epoch=trained.best_epoch,
        distill_seconds=trained.seconds, onnx=onnx.as_dict(),
        teacher=model_entry(measured["teacher_top1"], measured["teacher_bench"], sizes),
        student=model_entry(measured["student_top1"], measured["student_bench"], sizes),
        warnings=run.recipe.report_notes(run.out_dir), notes=data_notes(labelled) + cache_notes(run.logit_caches),
        selection=str(run.cfg.get("select_epoch", "last")))
    if run.logit_caches:
        report["logit_cache"] = {role: cache_record(path) for role, path in run.logit_caches.items()}
    report.update(run.recipe.report_fields(run.out_dir))  # e.g. uvc: top-1 after pruning, latency target
    if labelled.synthetic is not None:
        report["data_free"] = {"real_training_images": 0, "accuracy_measured": labelled.val is not None,
                               **labelled.synthetic}
    write_report(report, run.out_dir)
    return report


def data_notes(labelled: LabelledData) -> list[str]:
    """What the report must say about the data: a data-free run saw no real training image; without a
    validation split no accuracy was measured."""
    notes = []
    if labelled.synthetic is not None:
        notes.append(f"Data-free: this run saw no real training image; it trained on {labelled.synthetic['images']} "
                     f"images synthesised from the teacher ({labelled.synthetic['prior']} prior, "
                     f"{labelled.synthetic.get('settings', 'custom')} settings) in "
                     f"{labelled.synthetic['folder']}.")
    if labelled.val is None:
        notes.append("No accuracy was measured: there is no labelled validation set (pass --val-data DIR); the "
                     "student kept is the last epoch's.")
    return notes


# ----------------------------------------------------------------------------------------------- distill
