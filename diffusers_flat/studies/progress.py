"""One progress bar for a whole study (or shard): its tasks done out of all, and, with measured rates, the hours its
remaining tasks take by the plan's cost model (`StudyPlan.task_work` at the rates `benchmarks/study_cost.py`
measured).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from diffusers_flat.studies.plan import StudyPlan, Task


class StudyProgress:
    """A bar of `tasks` done out of all; with `rates`, its postfix is the hours left: the remaining tasks' work at
    `rates`, divided among the tasks that run at once (`parallel`).

    Args:
        plan: the study's plan (it costs each task).
        tasks: every task the bar counts, finished before or not.
        rates: rates `benchmarks/study_cost.py` measured for the study (`read_rates`), or None: tasks only.
        parallel: how many tasks run at once (a Ray cluster's slots; 1 here).
        desc: the bar's label.

    Example:
        >>> plan = StudyPlan(Study.load("studies/digits.yaml"), StudyDirectory("out"))  # doctest: +SKIP
        >>> tasks, rates = plan.tasks(1, 1), read_rates("rates.json", plan.study)  # doctest: +SKIP
        >>> with StudyProgress(plan, tasks, rates) as progress:  # doctest: +SKIP
        ...     progress.done(tasks[0])  # the bar's postfix: "3.2 h left"
    """

    def __init__(self, plan: StudyPlan, tasks: list[Task], rates: dict | None, parallel: int = 1, desc: str = "Study"):
        self.plan, self.rates, self.parallel = plan, rates, max(1, parallel)
        self.seconds_left = sum(self._seconds(task) for task in tasks)
        self.bar = tqdm(total=len(tasks), desc=desc)
        self._show()

    def _seconds(self, task: Task) -> float:
        return sum(self.plan.task_work(task).seconds(self.rates)) if self.rates else 0.0

    def _show(self) -> None:
        if self.rates:
            self.bar.set_postfix_str(f"{self.seconds_left / self.parallel / 3600:.1f} h left")

    def done(self, task: Task) -> None:
        """Count `task` as done (finished now, before, or left to another shard)."""
        self.seconds_left = max(0.0, self.seconds_left - self._seconds(task))
        self.bar.update(1)
        self._show()

    def __enter__(self) -> StudyProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
