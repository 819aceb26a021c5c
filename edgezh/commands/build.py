"""`edgezh build RECIPE`: load, plan, (dry-run or) run, and tell the person what came out."""

from __future__ import annotations

import shutil

from rich.table import Table

from edgezh import estimate, progress, quiet
from edgezh.export.modelfile import commands
from edgezh.pipeline import Plan, build_lock, make_plan, run_plan
from edgezh.progress import console, out
from edgezh.recipe_load import load_recipe

STATUS_TEXT = {"cached": "[green]cached[/]", "run": "[yellow]will run[/]", "forced": "[yellow]will run (forced)[/]",
               "skipped": "[dim]after --until[/]"}


def build(args) -> int:
    """RecipeError, PlanError and every other UserError go up to `edgezh.cli.main` (printed there, exit 2)."""
    recipe = load_recipe(args.recipe, args.overrides, allow_pickle=args.allow_pickle)
    plan = make_plan(recipe, until=args.until, start=args.start, force=tuple(args.force))
    if args.dry_run:
        print_plan(plan)
        return 0
    verbose = bool(getattr(args, "verbose", False))
    with build_lock(plan.root):
        log_path = plan.root / "build.log"
        console.print(f"[bold]{plan.recipe.name}[/] → {plan.root}/  [dim](library output: {log_path}"
                      f"{'' if verbose else '; -v shows it live'})[/]")
        try:
            with quiet.build_output(log_path, verbose=verbose):
                try:
                    run_plan(plan, on_step=_report)
                finally:
                    progress.end_stage()
        except Exception:
            _drop_partial(plan)
            raise
    _print_outputs(plan, args.recipe)
    return 0


def _drop_partial(plan: Plan) -> None:
    for step in plan.steps:
        tmp = step.folder.with_name(step.folder.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)


def _report(step, phase: str) -> None:
    if phase == "cached":
        console.print(f"[green]✓[/] {step.name:<10} cached  {step.folder}")
    elif phase == "start":
        progress.begin_stage(f"[bold]{step.folder.name}[/]: {step.spec.summary}")
    else:
        progress.end_stage()
        m = step.manifest or {}
        console.print(f"[green]✓[/] {step.name:<10} built in {m.get('wall_s', 0):.1f}s, peak RSS "
                      f"{m.get('peak_rss_mb', 0):.0f} MB  {step.folder}{_facts(m.get('info') or {})}")


def _facts(info: dict) -> str:
    """What a training stage's line adds: its steps and how the loss went."""
    first, final, steps = info.get("first_loss"), info.get("final_loss"), info.get("steps")
    if not isinstance(steps, int) or not isinstance(final, (int, float)):
        return ""
    loss = f"loss {first:.3f} → {final:.3f}" if isinstance(first, (int, float)) else f"loss {final:.3f}"
    return f"  [dim]({steps} steps, {loss})[/]"


def print_plan(plan: Plan) -> None:
    table = Table(title=f"plan for {plan.recipe.name} → {plan.root}/")
    for column in ("stage", "folder", "status", "key"):
        table.add_column(column)
    for step in plan.steps:
        text = STATUS_TEXT.get(step.status, step.status)
        if step.status == "run" and step.key is None:
            text = "[yellow]will run[/] (after its inputs)"
        table.add_row(step.name, step.folder.name, text, (step.key or "")[:12])
    out.print(table)
    _print_launches(plan)
    for item in estimate.report(plan.recipe):
        out.print(item)


def _print_launches(plan: Plan) -> None:
    """The launcher command of each training stage that runs in several processes (DeepSpeed)."""
    from edgezh.train.launch import dry_run_command

    for name, section in (("pretrain", plan.recipe.pretrain), ("sft", plan.recipe.sft), ("dpo", plan.recipe.dpo)):
        command = dry_run_command(section) if section is not None else None
        if command:
            out.print(f"{name} launches: {command}")


def _print_outputs(plan: Plan, recipe_arg: str) -> None:
    done = [s for s in plan.steps if s.artifact is not None]
    out.print(f"\n[bold]{plan.recipe.name}[/]: {len(done)} stage(s) ready under {plan.root}/")
    for step in done:
        out.print(f"  {step.name:<10} {step.folder}")
    out.print(f"  manifest   {plan.root / 'manifest.json'}")
    out.print(f"  log        {plan.root / 'build.log'}")
    if (plan.root / "report.md").is_file():
        out.print(f"  report     {plan.root / 'report.md'}")
    export = plan.root / "export"
    if export.is_dir():
        out.print(f"  export     {export}/  ({', '.join(sorted(p.name for p in export.iterdir()))})")
    modelfiles = next((s.artifact for s in done if s.name == "modelfile"), None)
    if modelfiles is not None:
        out.print("\nrun it with Ollama:")
        for kind, model in modelfiles.info["models"].items():
            first, second = commands(export, model, kind)
            out.print(f"  {first}\n  {second}")
    remaining = [s.name for s in plan.steps if s.status == "skipped"]
    if remaining:
        out.print(f"next: `edgezh build {recipe_arg}` without --until runs {', '.join(remaining)}")
