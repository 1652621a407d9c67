"""The `vlm-batch` command. Imports here stay light: `--help` must not load torch, vLLM or VLMEvalKit."""

from __future__ import annotations

import logging
import os
import sys

import click

from . import __version__
from .progress import quiet_when_piped
from .quiet import setup_logging
from .demo.sample_data import NAME as SAMPLE_DATASET, SETS as SAMPLE_SETS
from .vlmeval.datasets import KINDS


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(2)


def _resolve_model(name: str | None):
    from .plugins import UnknownModel, get_model, get_models

    if name:
        from .served import ServeError, checkpoint_card, looks_like_checkpoint

        try:
            return get_model(name)
        except UnknownModel as exc:
            if not looks_like_checkpoint(name):
                _fail(str(exc))
        try:
            return checkpoint_card(name)
        except ServeError as exc:
            _fail(str(exc))
    from .demo import demo_card

    demo = demo_card(get_models())
    if demo is None:
        _fail("No embedded demo model is installed; pass --model (see `vlm-batch models`) "
              "or install a model plugin that ships one (see the README)")
    return demo


class Names(click.Option):
    """An option that takes every word after it up to the next option, as run.py's `--data D1 D2`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("multiple", True)
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = parser._long_opt.get(name) or parser._short_opt.get(name)
            if option is None:
                continue
            take = option.process

            def process(value, state, take=take):
                take(value, state)
                while state.rargs and not state.rargs[0].startswith("-"):
                    take(state.rargs.pop(0), state)

            option.process = process


@click.group()
@click.version_option(__version__, prog_name="vlm-batch")
def cli():
    """Run VLMEvalKit evaluations through batched engines (vLLM, transformers)."""


@cli.command(name="eval")
@click.option("--model", "models", cls=Names, metavar="NAME [NAME ...]",
              help="VLMEvalKit model names, one engine each, one after another; default: the embedded demo model.")
@click.option("--dataset", "--data", "datasets", cls=Names, metavar="NAME [NAME ...]",
              help="VLMEvalKit dataset names, or $LMUData/<name>.tsv files' names; default: the sample suite "
                   f"({', '.join(SAMPLE_SETS)}).")
@click.option("--kind", type=click.Choice(list(KINDS)),
              help="Load local $LMUData/<name>.tsv datasets as VLMEvalKit datasets of this kind (multiple "
                   "choice, Yes/No, open answer), prompted and scored by that class; as a config's `class`.")
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help="A VLMEvalKit-style JSON of models (with overrides) and datasets, instead of --model/--dataset.")
@click.option("--work-dir", default="./outputs", show_default=True,
              help="Predictions go to WORK_DIR/MODEL/MODEL_DATASET.xlsx, as in VLMEvalKit; the suite's "
                   "summary to WORK_DIR/summary.csv.")
@click.option("--mode", type=click.Choice(["all", "infer", "eval"]), default="all", show_default=True)
@click.option("--rerun", is_flag=True, help="Generate again, even for datasets an earlier run finished.")
@click.option("--wait", "wait", is_flag=True,
              help="If another run holds a model and dataset of this one, wait for it instead of refusing.")
@click.option("--judge", default="exact_matching", show_default=True,
              help="VLMEvalKit judge: exact_matching scores offline; an API judge VLMEvalKit names (gpt-4o-mini, "
                   "...) as in VLMEvalKit; a vlm-batch model, checkpoint path or hub id is served here by vLLM's "
                   "OpenAI server on 127.0.0.1 for the scoring, then stopped.")
@click.option("--judge-base-url", metavar="URL",
              help="VLMEvalKit's flag: an OpenAI-compatible judge you already run (e.g. http://host:8000/v1); "
                   "--judge names its model (default: the one it serves).")
@click.option("--judge-nproc", type=click.IntRange(min=1), default=64, show_default=True,
              help="Concurrent calls to a local or --judge-base-url judge (enough to keep its batches full).")
@click.option("--judge-gpu-share", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True),
              help="On a GPU, the share of its memory a local judge's server takes (vLLM's "
                   "gpu_memory_utilization), so it runs beside the evaluated model's engine (give that one its "
                   "share with a config's vllm_args) instead of waiting until that engine is released.")
@click.option("--engine", type=click.Choice(["auto", "vllm", "hf"]), default="auto", show_default=True,
              help="auto: vLLM where it is installed and runs the model, else transformers (saying why); "
                   "vllm or hf: that engine or an error.")
@click.option("--use-vllm", is_flag=True, help="VLMEvalKit's flag: the same as --engine vllm.")
@click.option("--batch-size", type=click.IntRange(min=1),
              help="Sequences the engine runs at once (vLLM's max_num_seqs); default: the engine's own.")
@click.option("--max-batch-memory", help="Memory a transformers batch may use, e.g. 20GiB; default: "
              "from free device memory.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows of each dataset.")
@click.option("--trust-remote-code", is_flag=True, help="Allow checkpoints that ship their own code.")
@click.option("--nproc", default=4, show_default=True, help="Judge processes.")
@click.option("--prep-workers", type=click.IntRange(min=0),
              help="Processes preparing prompts and images (0: this one); default: one per core for "
                   "photo-sized images (at most 8), none for small ones.")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any item failed.")
@click.option("--truncate", is_flag=True, help="Cut the text of a prompt longer than the model's context, "
              "keeping its images, start and end (options, instruction), instead of failing the item; "
              "each cut is a warning, counted in the run report.")
@click.option("--tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="GPUs per engine (vLLM tensor parallel); under torchrun, per rank.")
@click.option("--ray", "use_ray", is_flag=True, help="Generate on a Ray cluster: replicas of the engine in a "
              "Ray Data pipeline (needs vlm-batch[ray]).")
@click.option("--ray-address", help="A running Ray cluster (e.g. auto, ray://head:10001); default: start one "
              "here. Implies --ray.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Engine replicas with --ray.")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0),
              help="GPUs each replica holds with --ray; default: --tp on GPU machines, 0 otherwise.")
@click.option("-v", "--verbose", is_flag=True, help="Engine logs, batch statistics and phase times.")
def eval_command(**flags):
    """Evaluate models on datasets; with no options, the embedded demo on the sample suite.

    `--model A B --dataset X Y Z` runs each model over every dataset through one engine, scoring each
    dataset while the next one generates. Under torchrun (RANK and WORLD_SIZE set) each rank answers
    its share of the rows on its own GPUs and rank 0 merges and scores, as VLMEvalKit's run.py does.
    """
    setup_logging(flags["verbose"])
    quiet_when_piped()
    settings = _settings(flags)
    from .engines import EngineError
    from .placement.ranks import RankError
    from .plan import PlanError
    from .prepare import PluginError
    from .progress import interactive
    from .state import Locked
    from .suite import run
    from .vlmeval import DatasetError
    from .writes import WriteError

    try:
        result = run(settings, started=_STARTED.get("at"), progress=interactive())
    except (DatasetError, EngineError, PluginError, RankError, Locked, PlanError, WriteError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        from .ending import exit_code, signal_of

        click.echo(f"\nInterrupted by {signal_of(exc).name}: every finished item is saved; rerun the same command "
                   "to resume.", err=True)
        sys.exit(exit_code(exc))
    _print(result, settings)
    status = exit_status(result, settings.strict)
    if status:
        sys.exit(status)


def _settings(flags: dict):
    """The command line's flags as the run's Settings: the one place they are read and checked."""
    from .settings import Settings

    flags = dict(flags)
    if flags.pop("use_vllm"):
        flags["engine"] = "vllm"
    judge = flags["judge"]
    if judge.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(judge)):
        _fail(f"--judge {judge}: no such checkpoint folder (a local judge is a folder, a vlm-batch model or a "
              "hub id)")
    use_ray, address, replicas, gpus = (flags.pop(k) for k in ("use_ray", "ray_address", "replicas",
                                                                "gpus_per_replica"))
    if use_ray or address:
        from .placement.ray import RayOptions

        flags["ray"] = RayOptions(address=address, replicas=replicas, gpus_per_replica=gpus)
    elif replicas != 1 or gpus is not None:
        _fail("--replicas and --gpus-per-replica are for --ray runs")
    if flags["max_batch_memory"]:
        from .memory import parse_size

        if flags["engine"] == "vllm":
            _fail("--max-batch-memory sizes transformers batches; vLLM manages its own memory")
        try:
            flags["max_batch_memory"] = parse_size(flags["max_batch_memory"])
        except ValueError as exc:
            _fail(str(exc))
    return Settings(**flags)


def exit_status(result, strict: bool) -> int:
    """0, or 2 when no model ran, 1 when a model, a scoring or (with --strict) an item failed; each said."""
    ran = [s for s in result.summaries if not s.error]
    status = 0
    for model in result.failed_models:
        click.echo(f"Error: {model['model']}: {model['error']}", err=True)
        status = 2 if not ran else 1
    for summary in ran:
        if summary.eval_error:
            click.echo(f"Error: evaluation of {summary.dataset} failed ({summary.eval_error}); the predictions "
                       f"are kept in {summary.prediction_file}", err=True)
            status = status or 1
    if strict and any(s.failed for s in ran):
        status = status or 1
    return status


def _print(result, settings) -> None:
    from .report import describe, table

    for summary in result.summaries:
        if not summary.error:
            click.echo("\n".join(describe(summary, settings.verbose)))
    if len(result.summaries) > 1:
        click.echo("\n" + table(result.summaries))
        click.echo(f"summary: {os.path.join(settings.work_dir, 'summary.csv')}")


@cli.command()
@click.option("--model", "model_name", help="VLMEvalKit model name; default: the embedded demo model.")
@click.option("--dataset", "dataset_name", default=SAMPLE_DATASET, show_default=True)
@click.option("--engine", type=click.Choice(["vllm", "hf"]), default="vllm", show_default=True)
@click.option("--limit", type=click.IntRange(min=4), default=128, show_default=True, help="Items to run.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Engine's sequences at once (as in eval).")
@click.option("--json", "json_path", default="bench.json", show_default=True, help="Where the figures go.")
@click.option("--chart", "chart_path", default="bench.png", show_default=True, help="A bar chart of them.")
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True,
              help="Interleaved rounds; each mode's median is reported.")
@click.option("--prep-workers", type=click.IntRange(min=0), help="As in eval.")
@click.option("--answer-tokens", type=click.IntRange(min=1),
              help="Make every answer exactly N tokens long, in every mode (e.g. 128: an open-answer set's).")
@click.option("--warm", is_flag=True,
              help="Keep VLMEvalKit's image files between rounds, as a second evaluation of a dataset finds them.")
@click.option("--trust-remote-code", is_flag=True)
@click.option("-v", "--verbose", is_flag=True)
def bench(model_name, dataset_name, engine, limit, batch_size, json_path, chart_path, repeat, prep_workers,
          answer_tokens, warm, trust_remote_code, verbose):
    """Items/s one at a time, in fixed batches of 4, and batched by vlm-batch, in one run; photo-sized
    images with --dataset VLMBatchPhotos or VLMBatchScans, long answers with --answer-tokens."""
    setup_logging(verbose)
    quiet_when_piped()
    card = _resolve_model(model_name)
    from .bench import run_bench, write_chart, write_json
    from .engines import EngineError
    from .engines.choice import decide
    from .vlmeval import DatasetError

    options = {"batch_size": batch_size, "trust_remote_code": trust_remote_code, "verbose": verbose}
    try:
        decide(card, engine, trust_remote_code)
        report = run_bench(card, dataset_name, engine=engine, limit=limit, engine_options=options,
                           prep_workers=prep_workers, repeat=repeat, answer_tokens=answer_tokens, warm=warm,
                           log=click.echo)
    except (DatasetError, EngineError) as exc:
        _fail(str(exc))
    write_json(report, json_path)
    write_chart(report, chart_path)
    for name, ratio in report["ratios"].items():
        click.echo(f"{name.replace('_', ' ')}: {ratio}x")
    same = report["same_predictions"]
    verdict = "identical" if all(same.values()) else "DIFFERENT: " + ", ".join(k for k, v in same.items() if not v)
    click.echo(f"greedy predictions across modes: {verdict}")
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"figures: {json_path}, chart: {chart_path}")
    if not all(same.values()):
        sys.exit(1)


@cli.command()
@click.option("--all", "show_all", is_flag=True,
              help="Also the VLMEvalKit names of served classes that no plugin can run, each with the reason.")
def models(show_all):
    """Every model name by family, the plugin serving it and its engines."""
    from .plugins import get_models, get_unserved
    from .served import listing

    cards = get_models()
    unserved = get_unserved() if show_all else []
    if not cards and not unserved:
        click.echo("No models: install a model plugin (see the README).")
        return
    click.echo("\n".join(listing(cards, unserved)))


@cli.command()
def plugins():
    """Installed plugins, their versions and the hooks each implements."""
    from .plugins import get_plugins

    for p in get_plugins():
        version = f" {p['version']}" if p["version"] else ""
        click.echo(f"{p['name']} ({p['distribution'] or 'in-process'}{version}): {', '.join(p['hooks'])}")


_STARTED: dict = {}   # when this process began, for the run's phase times (set by `main`)


def main():
    """The console script: runs the command, then leaves without the interpreter's slow teardown.

    Every file is written and synced before a command returns, and engines and servers are closed;
    what is left is garbage collection of the heavy libraries, seconds of it, which nothing needs.
    """
    from .ending import exit_code, stop_on_signals
    from .timeline import process_start

    _STARTED["at"] = process_start()
    stop_on_signals()
    code = 0
    try:
        cli(standalone_mode=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort as exc:   # click's word for Ctrl-C (and our Stopped) outside `eval`
        click.echo("Aborted!", err=True)
        code = exit_code(exc.__cause__) if isinstance(exc.__cause__, KeyboardInterrupt) else 1
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except KeyboardInterrupt as exc:
        code = exit_code(exc)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
