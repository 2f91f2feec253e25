"""Running a study's plan on a Ray cluster (`run_study.py --executor ray`): every training is a Ray task that runs the
same `accelerate launch` the local executor runs (`StudyRunner.train`), every evaluation a task that waits for its
training, each with the resources the study file names per task; as many at once as the cluster's resources allow,
on any of its nodes. A task whose worker dies is retried by Ray, and its training resumes from its latest checkpoint,
exactly; what has finished is never redone (the study directory's `done/` records, as with the local executor).

The study directory must be on storage every node sees (the driver writes a token there, and a task that cannot read
it refuses to run). Ray is an optional extra: `pip install -e ".[cluster]"`.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from diffusers_flat.errors import FlatError
from diffusers_flat.studies.config import Study
from diffusers_flat.studies.directory import StudyDirectory
from diffusers_flat.studies.plan import EMPIRICAL, TRAIN, StudyPlan, Task
from diffusers_flat.studies.results import StudyResults
from diffusers_flat.studies.runner import StudyRunner, TaskFailed

RETRIES = 2  # a task Ray runs again after its worker died or its training failed, before the study fails
TOKEN = ".ray-token"  # the driver's mark in the study directory: what a task reads to know it sees the same folder


def _ray():
    try:
        import ray
    except ImportError:
        raise FlatError('executor ray: Ray is not installed; pip install -e ".[cluster]"', "executor") from None
    return ray


@dataclass(frozen=True)
class StudyContext:
    """What a task needs to rebuild the driver's plan on any node: the study file, the study directory and the
    training script (absolute paths), the driver's working directory (study files name recipes relative to it) and
    the driver's token in the study directory."""

    study: str
    output_dir: str
    train_script: str
    cwd: str
    token: str

    def runner(self) -> StudyRunner:
        """This node's runner of the driver's plan, after checking that this node sees the driver's study directory."""
        token = Path(self.output_dir) / TOKEN
        try:
            seen = token.read_text()
        except OSError:
            seen = None
        if seen != self.token:
            raise FlatError(
                f"output_dir {self.output_dir}: node {socket.gethostname()} does not see the study directory the "
                "driver wrote; put it on storage every node of the cluster mounts at the same path",
                "output_dir",
            )
        os.chdir(self.cwd)
        plan = StudyPlan(Study.load(self.study), StudyDirectory(self.output_dir))
        return StudyRunner(plan, Path(self.train_script))


def _execute(context: StudyContext, task: Task, *waits_for: str) -> str:
    """Do one task of the plan on this node (skipped when finished before); `waits_for`: the names of the tasks it
    depends on, which Ray has finished before it starts."""
    context.runner().execute(task)
    return describe(task)


def describe(task: Task) -> str:
    if task.kind == TRAIN:
        return f"train {task.run.name}"
    if task.kind == EMPIRICAL:
        return "evaluate the empirical denoiser"
    return f"evaluate {task.run.name} {task.variant}{' against the teacher' if task.against_teacher else ''}"


class RayStudyRunner:
    """The Ray executor of a study's plan: its tasks submitted to a Ray cluster with their dependencies, each
    evaluation after its training (a student's E_gen after the teacher's too), the grid after the tuning.

    Args:
        plan: the study's plan (`StudyPlan`).
        train_script: the training script each training launches.
        address: the cluster's address ("auto": the one this node belongs to), or None: a cluster of this machine
            alone, started for the study and stopped after it.
        resources: Ray resources of each task, e.g. {"num_cpus": 2, "num_gpus": 1}; None: a whole node's CPUs (one
            GPU where the node has any).

    Example:
        >>> plan = StudyPlan(Study.load("studies/digits.yaml"), StudyDirectory("out"))  # doctest: +SKIP
        >>> RayStudyRunner(plan, Path("train.py"), address="auto").run()  # doctest: +SKIP
    """

    def __init__(self, plan: StudyPlan, train_script: Path, address: str | None = None, resources: dict | None = None):
        self.plan, self.train_script, self.address, self.resources = plan, train_script, address, resources
        self.study, self.directory = plan.study, plan.directory

    def _context(self) -> StudyContext:
        self.directory.path.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        (self.directory.path / TOKEN).write_text(token)
        absolute = lambda path: str(Path(path).resolve())  # noqa: E731
        return StudyContext(
            absolute(self.study.path), absolute(self.directory.path), absolute(self.train_script), os.getcwd(), token
        )

    def _options(self, ray) -> dict:
        resources = self.resources
        if resources is None:
            nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
            gpus = min(node.get("GPU", 0) for node in nodes)
            resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": min(n["CPU"] for n in nodes)}
        # a training that failed (its worker killed, its process crashed) is run again: it resumes from its checkpoint
        return {**resources, "max_retries": RETRIES, "retry_exceptions": [TaskFailed]}

    def _wait(self, ray, refs: dict, progress: tqdm) -> None:
        """Wait for every task of `refs` (ObjectRef -> its task); the first that fails after its retries fails the
        study, in one line naming the run and its log."""
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                task = refs[done[0]]
                why = err.cause if isinstance(err.cause, FlatError) else type(err.cause).__name__
                log = f"; see {self.directory.log(task.run)}" if task.run is not None else ""
                message = f"study: {describe(task)} failed after {RETRIES} retries ({why}){log}"
                raise FlatError(message, "study") from None
            except ray.exceptions.RayError as err:
                raise FlatError(f"study: {describe(refs[done[0]])} failed: {err}", "study") from None
            progress.update(1)

    def _submit(self, execute, context: StudyContext, tasks: list[Task], trained: dict) -> dict:
        """Submit `tasks` in order; each evaluation waits for its training (`trained`: run name -> its training's
        ObjectRef, grown here), E_gen and the empirical sweep for the teacher's."""
        refs = {}
        teacher = self.study.teacher_runs()[0].name if self.study.generalization else None
        for task in tasks:
            waits = []
            if task.kind == TRAIN:
                ref = execute.remote(context, task)
                trained[task.run.name] = ref
            else:
                if task.run is not None:
                    waits.append(trained.get(task.run.name))
                if task.against_teacher or task.kind == EMPIRICAL:
                    waits.append(trained.get(teacher))
                ref = execute.remote(context, task, *[w for w in waits if w is not None])
            refs[ref] = task
        return refs

    def run(self) -> None:
        """Run every task of the study on the cluster, skipping what is finished (each task checks for itself)."""
        ray = _ray()
        ray.init(address=self.address, log_to_driver=False, include_dashboard=False)
        try:
            context = self._context()
            execute = ray.remote(_execute).options(**self._options(ray))
            plan, trained = self.plan, {}
            tuning = plan.tuning_tasks(1, 1)
            grid, _ = plan.grid_tasks(1, 1, self.study.tuning.values[0] if self.study.tuning else None)
            with tqdm(total=len(tuning) + len(grid), desc="Study (Ray)") as progress:
                self._wait(ray, self._submit(execute, context, tuning, trained), progress)
                tuned, _ = StudyResults(plan).tuning_table()
                grid, _ = plan.grid_tasks(1, 1, tuned)
                self._wait(ray, self._submit(execute, context, grid, trained), progress)
        finally:
            ray.shutdown()
