"""Training job states: naming them and telling whether a job has finished.

Kept apart from the training client because errors (TrainingFailedError) name job states too.
"""

from __future__ import annotations

from mlsignal.v1 import training_pb2

__all__ = ["FINAL_STATES", "is_final", "job_state_name"]

FINAL_STATES = frozenset(
    {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}
)


def job_state_name(state: int) -> str:
    """Short name of a JobState value: ``"SUCCEEDED"`` for JOB_STATE_SUCCEEDED.

    Values this client does not know (from a newer server) get ``STATE_<n>`` instead of an exception.

    Example::

        >>> job_state_name(training_pb2.JOB_STATE_FAILED)                  # doctest: +SKIP
        'FAILED'
    """
    try:
        return training_pb2.JobState.Name(state).removeprefix("JOB_STATE_")
    except ValueError:
        return f"STATE_{state}"


def is_final(job: training_pb2.TrainingJob) -> bool:
    """True when the job is SUCCEEDED, FAILED or CANCELLED: nothing about it will change any more.

    Example::

        >>> while not is_final(handle.refresh()):                           # doctest: +SKIP
        ...     time.sleep(5)
    """
    return job.state in FINAL_STATES
