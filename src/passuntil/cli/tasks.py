"""`passuntil prompts`: the exact text each instance sends to the model, and how it is judged.

    passuntil prompts --task examples/capitals.yaml --limit 2
    passuntil prompts --task humaneval --instance 0 --jsonl

Each instance's full prompt (preamble and few-shot examples included, exactly as the engine
builds it), its stop sequences, token limit and check. `--jsonl` writes one JSON object per
instance, for diffing or for feeding another harness the same prompts.
"""

from __future__ import annotations

import json

import click

from passuntil.cli.common import cli
from passuntil.errors import UserError


def prompt_records(task_name: str, *, limit: int | None = None, instance_ids=()) -> list[dict]:
    """One record per selected instance: task, id, prompt, shots used, stop, max tokens, check."""
    from passuntil.tasks import get_task

    task = get_task(task_name)
    chosen = list(task.instances)
    if instance_ids:
        by_id = {x.id: x for x in chosen}
        missing = [i for i in instance_ids if i not in by_id]
        if missing:
            some = ", ".join(list(by_id)[:5]) + (", ..." if len(by_id) > 5 else "")
            raise UserError(f"task {task.name!r} has no instance {missing[0]!r} (ids: {some})")
        chosen = [by_id[i] for i in dict.fromkeys(instance_ids)]
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        chosen = chosen[:limit]
    check = getattr(task.check, "spec", repr(task.check))
    return [{"task": task.name, "instance": x.id, "prompt": task.prompt(x),
             "shots": [s.id for s in task.few_shot.shots_for(x)] if task.few_shot else [],
             "stop": list(task.stop), "max_tokens": task.max_new_tokens, "check": check,
             "references": list(x.references)}
            for x in chosen]


@cli.command("prompts")
@click.option("--task", "task_name", required=True, help="A task name or a .yaml/.jsonl task file.")
@click.option("--limit", type=int, default=None, help="Only the first N instances.")
@click.option("--instance", "instance_ids", multiple=True, help="Only this instance id (repeat for several).")
@click.option("--jsonl", "as_jsonl", is_flag=True, help="One JSON object per instance.")
def prompts_cmd(task_name, limit, instance_ids, as_jsonl):
    """Print each instance's exact prompt (few-shot included), stop sequences, max tokens and check.

    Max tokens is the task's own; `eval --max-tokens`, where given, overrides it."""
    records = prompt_records(task_name, limit=limit, instance_ids=instance_ids)
    if as_jsonl:
        for r in records:
            click.echo(json.dumps(r, ensure_ascii=False))
        return
    for k, r in enumerate(records, 1):
        click.echo(f"=== {r['task']} / {r['instance']} ({k} of {len(records)}) ===")
        click.echo(f"check: {r['check']}   stop: {json.dumps(r['stop'])}   "
                   f"max tokens: {r['max_tokens']}   references: {json.dumps(r['references'])}")
        if r["shots"]:
            click.echo(f"shots: {', '.join(r['shots'])}")
        click.echo(f"--- prompt ({len(r['prompt'])} characters) ---")
        click.echo(r["prompt"])
        click.echo(f"--- end of prompt (its last characters: {r['prompt'][-20:]!r}) ---\n")
