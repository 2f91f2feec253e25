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

from diffusers_flat.errors import FlatError
from diffusers_flat.studies.config import Study
from diffusers_flat.studies.directory import StudyDirectory
from diffusers_flat.studies.plan import EMPIRICAL, TRAIN, StudyPlan, Task
from diffusers_flat.studies.progress import StudyProgress
from diffusers_flat.studies.results import StudyResults
from diffusers_flat.studies.runner import StudyRunner, TaskFailed
from diffusers_flat.utils.processes import usable_cores

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

    def runner(self, cpu_threads: int | None = None) -> StudyRunner:
        """This node's runner of the driver's plan (`cpu_threads`: the task's CPUs), after checking that this node
        sees the driver's study directory."""
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
        return StudyRunner(plan, Path(self.train_script), cpu_threads)


def _execute(context: StudyContext, task: Task, *waits_for: str) -> str:
    """Do one task of the plan on this node (skipped when finished before); `waits_for`: the names of the tasks it
    depends on, which Ray has finished before it starts."""
    # the task's CPUs become its trainings' and evaluations' torch threads: each would otherwise spin all the node's
    # cores, and tasks sharing a node would slow one another down many times over
    cpus = _ray().get_runtime_context().get_assigned_resources().get("CPU")
    context.runner(max(1, int(cpus)) if cpus else None).execute(task)
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
        rates: rates `benchmarks/study_cost.py` measured for the study (`read_rates`): the bar shows the hours left
            while the cluster runs as many tasks at once as its resources allow; None: tasks only.

    Example:
        >>> plan = StudyPlan(Study.load("studies/digits.yaml"), StudyDirectory("out"))  # doctest: +SKIP
        >>> RayStudyRunner(plan, Path("train.py"), address="auto").run()  # doctest: +SKIP
    """

    def __init__(
        self,
        plan: StudyPlan,
        train_script: Path,
        address: str | None = None,
        resources: dict | None = None,
        rates: dict | None = None,
    ):
        self.plan, self.train_script, self.address = plan, train_script, address
        self.resources, self.rates = resources, rates
        self.study, self.directory = plan.study, plan.directory

    def _context(self) -> StudyContext:
        self.directory.path.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(8)
        (self.directory.path / TOKEN).write_text(token)
        absolute = lambda path: str(Path(path).resolve())  # noqa: E731
        return StudyContext(
            absolute(self.study.path), absolute(self.directory.path), absolute(self.train_script), os.getcwd(), token
        )

    def _resources(self, ray) -> dict:
        """Each task's resources: the study file's, or a whole node's CPUs (one GPU where every node has one)."""
        if self.resources is not None:
            return self.resources
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        gpus = min(node.get("GPU", 0) for node in nodes)
        return {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": min(n["CPU"] for n in nodes)}

    @staticmethod
    def _slots(ray, resources: dict) -> int:
        """About how many tasks of `resources` the cluster runs at once (its resources summed over its nodes)."""
        cluster = ray.cluster_resources()
        kinds = (("CPU", "num_cpus"), ("GPU", "num_gpus"))
        fits = [cluster.get(key, 0) // resources[name] for key, name in kinds if resources.get(name)]
        return max(1, int(min(fits, default=1)))

    def _wait(self, ray, refs: dict, progress: StudyProgress) -> None:
        """Wait for every task of `refs` (ObjectRef -> its task); the first that fails after its retries fails the
        study, in one line naming the run and its log."""
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            task = refs[done[0]]
            try:
                ray.get(done[0])
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, TaskFailed):  # retried RETRIES times; its log says why
                    log = self.directory.log(task.run)
                    raise FlatError(
                        f"study: {describe(task)} failed after {RETRIES} retries; see {log}", "study"
                    ) from None
                why = err.cause if isinstance(err.cause, FlatError) else f"{type(err.cause).__name__}: {err.cause}"
                raise FlatError(f"study: {describe(task)} failed: {why}", "study") from None
            except ray.exceptions.RayError as err:  # its worker died on every try
                raise FlatError(f"study: {describe(task)} failed after {RETRIES} retries: {err}", "study") from None
            progress.done(task)

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
        # a cluster started here gets the cores this process may use (Ray counts the machine's, ignoring a pin)
        starts_one = self.address is None and "RAY_ADDRESS" not in os.environ
        here = {"num_cpus": usable_cores()} if starts_one else {}
        ray.init(address=self.address, log_to_driver=False, include_dashboard=False, **here)
        try:
            context = self._context()
            resources = self._resources(ray)
            # a training that failed (its worker killed, its process crashed) runs again, from its checkpoint
            execute = ray.remote(_execute).options(**resources, max_retries=RETRIES, retry_exceptions=[TaskFailed])
            plan, trained = self.plan, {}
            tuning = plan.tuning_tasks(1, 1)
            slots = self._slots(ray, resources)
            with StudyProgress(plan, plan.tasks(1, 1), self.rates, slots, desc="Study (Ray)") as progress:
                self._wait(ray, self._submit(execute, context, tuning, trained), progress)
                tuned, _ = StudyResults(plan).tuning_table()
                grid, _ = plan.grid_tasks(1, 1, tuned)
                self._wait(ray, self._submit(execute, context, grid, trained), progress)
        finally:
            ray.shutdown()
