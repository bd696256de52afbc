"""Shared helpers for trainer tests (`opd train` through `student_trainer.trainer.Trainer`)."""

from __future__ import annotations


def capture_steps(trainer) -> dict:
    """The StepData (rollouts + teacher statistics) of every step the trainer's producer makes,
    by step, as the optimizer loop receives it: the producer's `produce` is wrapped in place."""
    got, produce = {}, trainer.producer.produce

    def wrapped(step):
        got[step] = produce(step)
        return got[step]

    trainer.producer.produce = wrapped
    return got
