"""Distillation pipeline: Llama teacher -> hybrid Mamba/attention student.

Stages (each optional, resumable): init -> progressive replacement -> distillation
fine-tuning -> preference alignment (DPO) -> export. Entry points:
``distillation.cli.distill_main`` and ``distillation.evaluate.eval_main``.
"""
