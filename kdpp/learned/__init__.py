"""kdpp.learned: a trained testbed on scikit-learn's bundled 8x8 digits (no download).

An EDM-preconditioned class-conditional teacher (label dropout, so classifier-free guidance works),
students distilled from its ODE endpoints, and metrics in a fixed classifier's features: see
``docs/learned.md``. Needs the ``learned`` extra (scikit-learn).
"""
from .data import NULL_CLASS, load_digits, split, to_images
from .metrics import DigitsMetrics, class_accuracy, frechet_distance, histogram, mean_ci
from .nets import DigitsClassifier, EDMDenoiser
from .trained import (PROVENANCE, STUDENTS, TEACHER_CFG, WEIGHTS, CountedNet, TeacherODEStudent, conditioning, guided_teacher,
                      load_nets, provenance, sample_student, sample_teacher)

__all__ = [
    "NULL_CLASS", "PROVENANCE", "STUDENTS", "TEACHER_CFG", "WEIGHTS", "CountedNet", "DigitsClassifier", "DigitsMetrics",
    "EDMDenoiser", "TeacherODEStudent", "class_accuracy", "conditioning", "frechet_distance", "guided_teacher",
    "histogram", "load_digits", "load_nets", "mean_ci", "provenance", "sample_student", "sample_teacher", "split",
    "to_images",
]
