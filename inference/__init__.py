"""Translate with any rk-distill model folder: a student, or a (fine-tuned) Qwen teacher.

    from inference import Translator
    Translator("runs/quickstart/distill/final").translate(["打开文件"], "zh-en")
"""

from inference.translator import InputTooLongError, Translator

__all__ = ["InputTooLongError", "Translator"]
