"""Distillation parts recipes compose: teachers, feature taps, losses and training tasks."""
