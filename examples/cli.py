"""`python -m tfnegcache train`: the MovieLens comparison of negative strategies.

Run `python -m tfnegcache train --help` for the options.

Arguments are parsed and checked with the standard library alone, so `--help` and argument
errors come back at once: TensorFlow, the data and the `examples` extra's packages are only
touched once the arguments are known to be good.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

DEFAULT_STRATEGIES = "in-batch,in-batch-logq,full-softmax,negative-cache"
VERBOSITY = ("auto", "0", "1", "2")


class _Parser(argparse.ArgumentParser):
    """Reports a usage error in one line (no usage block) and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to every option but the flags, whose help says it in words."""

    def _get_help_string(self, action):
        if action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m tfnegcache`; numbers stay strings until `check_args`."""
    parser = _Parser(
        prog="python -m tfnegcache",
        description="Train two-tower retrieval models with a negative cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="compare negative strategies on MovieLens 100k",
        description=(
            "Train one two-tower model (user id | movie id + title tokens + genres) on "
            "MovieLens 100k with each negative strategy (in-batch, in-batch with logQ "
            "correction, exact full softmax, negative cache), same towers, optimizer and "
            "epochs for all, and print Recall@10/50/100, MRR (exact, over all movies) and "
            "seconds per epoch, averaged over the seeds. Writes <output-dir>/main_job.json, "
            "<output-dir>/recall_at_100.png and exports the first seed's cache-trained model "
            "to <export-dir>/movielens_negative_cache/1 (a TF Serving SavedModel), its "
            "towers to <output-dir>/checkpoints/negative-cache-seed<N> (for `export`). "
            'Needs the examples extra: pip install "tfnegcache[examples]".'),
        formatter_class=_HelpFormatter)
    train.set_defaults(parser=train)  # for errors that name the subcommand
    train.add_argument("--seeds", "--seed", default="0,1,2",
                       help="comma-separated seeds (model init, shuffling, cache draws); the "
                            "table reports their mean")
    train.add_argument("--epochs", default="3", help="training epochs per run")
    train.add_argument("--batch-size", default="256", help="training examples per step")
    train.add_argument("--learning-rate", default="0.1", help="Adagrad learning rate")
    train.add_argument("--embedding-dim", default="32",
                       help="size of the user and movie embeddings")
    train.add_argument("--temperature", default="1.0",
                       help="divides the logits of every strategy's softmax")
    train.add_argument("--cache-size", default="2048",
                       help="negative cache slots, at least --batch-size (>= 1682 holds "
                            "every movie)")
    train.add_argument("--num-negatives", default="8",
                       help="negatives drawn from the cache per query per step")
    train.add_argument("--cache-with-in-batch", dest="cache_in_batch", action="store_true",
                       help="negative cache: also use in-batch negatives (default: off, the "
                            "softmax is over [positive, cache])")
    train.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                       help="comma-separated subset of the four strategies, run in this order")
    train.add_argument("--split", choices=("tutorial", "temporal"), default="tutorial",
                       help="tutorial: random 80%%/20%%; temporal: each user's latest rating "
                            "held out")
    train.add_argument("--data-dir", default=None,
                       help="MovieLens 100k directory (GroupLens or RecBole layout); None: "
                            "the user cache, then TFDS, then the RecBole wheel from PyPI")
    train.add_argument("--output-dir", default="results",
                       help="where main_job.json, the plot and the checkpoints go")
    train.add_argument("--export-dir", default="saved_models",
                       help="base directory of the exported SavedModel")
    train.add_argument("--no-export", dest="export", action="store_false",
                       help="skip the SavedModel export and the towers' checkpoint (default: "
                            "export them)")
    train.add_argument("--verbose", default="auto", metavar="{auto,0,1,2}",
                       help="Keras fit output: 1 progress bars, 2 one line per epoch, 0 quiet, "
                            "auto: 1 on a terminal, else 2")
    export = sub.add_parser(
        "export",
        help="export a checkpoint written by train as a TF Serving SavedModel",
        description=(
            "Rebuild the towers of a checkpoint written by `train` "
            "(<output-dir>/checkpoints/negative-cache-seed<N>), encode every movie with the "
            "candidate tower and write <export-dir>/<name>/<version>/: user_id -> top-k movie "
            "ids and scores (brute force)."),
        formatter_class=_HelpFormatter)
    export.set_defaults(parser=export)
    export.add_argument("checkpoint", help="checkpoint directory written by train")
    export.add_argument("--data-dir", default=None,
                        help="MovieLens directory; None: the one train used")
    export.add_argument("--k", default="100", help="movies returned per user (all of them if fewer)")
    export.add_argument("--export-dir", default="saved_models",
                        help="base directory of the SavedModel")
    export.add_argument("--name", default="movielens_negative_cache",
                        help="model name: the directory under --export-dir")
    export.add_argument("--version", default="1",
                        help="model version: the directory under --name")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing export of that name and version (default: "
                             "off, an existing non-empty export directory is an error)")
    cost = sub.add_parser(
        "cost",
        help="time your model's train step with its cache and with in-batch negatives",
        description=(
            "Import MODULE (from the working directory or the Python path), call FUNCTION() "
            "to get (model, batch): a compiled CachedRetrievalModel whose tasks have caches, "
            "and one training batch. Time its train step with the cache, with in-batch "
            "negatives only, and the cache's scoring alone, and print rho (the towers' cost "
            "per example over the scoring cost per query), the step overhead and the "
            "per-step gain the cache needs to break even (tfnegcache.measure_cost). The "
            "model is left as it was."),
        formatter_class=_HelpFormatter)
    cost.set_defaults(parser=cost)
    cost.add_argument("target", metavar="MODULE:FUNCTION",
                      help="e.g. my_project.towers:make_model_and_batch")
    cost.add_argument("--steps", default="10", help="timed steps of each kind")
    cost.add_argument("--warmup", default="2", help="untimed steps before (the first traces)")
    return parser


def _number(parser, args, option, kind, minimum, expected, strict=False):
    """Converts `option`'s text to `kind` and checks it against `minimum`, or exits."""
    text = getattr(args, option.lstrip("-").replace("-", "_"))
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum or (
            strict and value == minimum):
        parser.error(f"{option} must be {expected}. Received: {option} {text}")
    setattr(args, option.lstrip("-").replace("-", "_"), value)


def _data_dir(parser, option, path, where=""):
    """Checks that `path` holds MovieLens 100k files, or exits naming what was expected."""
    from tfnegcache_examples import movielens_data as movielens  # pylint: disable=import-outside-toplevel
    try:
        movielens.directory_layout(path)
        return
    except FileNotFoundError:
        pass
    directory = Path(path)
    if not directory.exists():
        found = "which does not exist"
    elif not directory.is_dir():
        found = "which is not a directory"
    else:
        names = sorted(p.name for p in directory.iterdir())
        found = f"which holds {', '.join(names[:5]) + (', ...' if len(names) > 5 else '')}"
        found = found if names else "which is empty"
    parser.error(
        f"{option} must be a directory holding MovieLens 100k: "
        f"{' and '.join(movielens.GROUPLENS_FILES)} (GroupLens layout) or "
        f"{' and '.join(movielens.RECBOLE_FILES[:2])} (RecBole layout). "
        f"Received: {option} {path}{where}, {found}")


def check_args(args) -> None:
    """Turns the numbers' text into values and checks every argument, or exits with 2.

    Touches no TensorFlow and reads no data: only the file system, for --data-dir and the
    checkpoint.
    """
    # pylint: disable=import-outside-toplevel
    from tfnegcache_examples import _extras
    from tfnegcache_examples import STRATEGIES

    sub = args.parser
    if args.command == "cost":
        module, _, function = args.target.partition(":")
        if not module or not function or not all(
                part.isidentifier() for part in module.split(".") + [function]):
            sub.error("MODULE:FUNCTION must name a function of an importable module, e.g. "
                      f"my_project.towers:make_model_and_batch. Received: {args.target}")
        _number(sub, args, "--steps", int, 1, "an integer >= 1")
        _number(sub, args, "--warmup", int, 0, "an integer >= 0")
        return
    if args.command == "train":
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            seeds = []
        if not seeds or min(seeds) < 0:
            sub.error("--seeds must be a comma-separated list of integers >= 0, e.g. 0,1,2. "
                      f"Received: --seeds {args.seeds}")
        args.seeds = seeds
        _number(sub, args, "--epochs", int, 1, "an integer >= 1")
        _number(sub, args, "--batch-size", int, 1, "an integer >= 1")
        _number(sub, args, "--cache-size", int, 1, "an integer >= 1 (slots in the cache)")
        _number(sub, args, "--num-negatives", int, 1,
                "an integer >= 1 (negatives drawn from the cache per query)")
        _number(sub, args, "--embedding-dim", int, 1, "an integer >= 1")
        _number(sub, args, "--temperature", float, 0, "a number > 0", strict=True)
        _number(sub, args, "--learning-rate", float, 0, "a number > 0", strict=True)
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        unknown = [n for n in names if n not in STRATEGIES]
        if unknown or not names or len(set(names)) != len(names):
            sub.error(f"--strategies must be a comma-separated list of distinct names from "
                      f"{', '.join(STRATEGIES)}. Received: --strategies {args.strategies}")
        args.strategies = names
        if args.verbose not in VERBOSITY:
            sub.error(f"--verbose must be one of {', '.join(VERBOSITY)}. "
                      f"Received: --verbose {args.verbose}")
        args.verbose = ((1 if sys.stdout.isatty() else 2) if args.verbose == "auto"
                        else int(args.verbose))
        if args.data_dir is not None:
            _data_dir(sub, "--data-dir", args.data_dir)
        if not _extras.is_available("matplotlib"):
            sub.error(_extras.missing_message("matplotlib", "Plotting recall_at_100.png"))
    elif args.command == "export":
        _number(sub, args, "--k", int, 1, "an integer >= 1")
        _number(sub, args, "--version", int, 0, "an integer >= 0")
        checkpoint = Path(args.checkpoint)
        expected = ("checkpoint must be a directory written by `python -m tfnegcache train` "
                    "(<output-dir>/checkpoints/negative-cache-seed<N>, holding config.json and "
                    f"towers.index). Received: {checkpoint}")
        if not checkpoint.is_dir():
            sub.error(f"{expected}, which "
                      f"{'is not a directory' if checkpoint.exists() else 'does not exist'}")
        missing = [n for n in ("config.json", "towers.index") if not (checkpoint / n).is_file()]
        if missing:
            sub.error(f"{expected}, which has no {' and no '.join(missing)}")
        try:
            args.config = json.loads((checkpoint / "config.json").read_text())
            int(args.config["embedding_dim"])
        except (ValueError, KeyError, TypeError) as e:
            sub.error(f"{expected}, whose config.json is not train's ({type(e).__name__}: {e})")
        target = Path(args.export_dir) / args.name / str(args.version)
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and not args.overwrite:
            sub.error(f"the export directory {target} already exists and is not empty; pass "
                      "--overwrite to replace it, or choose another --version")
        if args.data_dir is not None:
            _data_dir(sub, "--data-dir", args.data_dir)
        elif args.config.get("data_dir") is not None:
            args.data_dir = args.config["data_dir"]
            _data_dir(sub, "--data-dir", args.data_dir,
                      where=" (from the checkpoint's config.json)")


def _load(data_dir):
    """MovieLens from `data_dir` alone when given (no fallback), else the default sources."""
    from tfnegcache_examples import movielens_data as movielens  # pylint: disable=import-outside-toplevel
    if data_dir is None:
        return movielens.load()
    return movielens.load(data_dir=data_dir, sources=("dir",))


def export(args):
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import tensorflow as tf
    from tfnegcache_examples import movielens as experiment
    from tfnegcache.export import export_retrieval_model

    checkpoint = Path(args.checkpoint)
    data = _load(args.data_dir)
    # The towers' vocabularies come from all ratings and movies, whatever the split.
    corpus = experiment.Corpus(data, np.arange(len(data.ratings["user_id"])),
                               np.zeros([0], np.int64))
    dim = int(args.config["embedding_dim"])
    query_tower = experiment.query_tower(corpus.users, dim)
    candidate_tower = experiment.CandidateTower(corpus.num_movies, len(corpus.vocab), dim)
    query_tower(tf.constant(corpus.users[:1]))
    movies = candidate_tower(corpus.movie_tensors())  # builds the variables, then restore
    tf.train.Checkpoint(query_tower=query_tower, candidate_tower=candidate_tower).read(
        str(checkpoint / "towers")).assert_existing_objects_matched()
    movies = candidate_tower(corpus.movie_tensors())
    path = export_retrieval_model(
        query_tower, movies, corpus.movie_ids, k=min(args.k, corpus.num_movies),
        name=args.name, version=args.version, base_dir=args.export_dir,
        overwrite=args.overwrite)
    print(f"exported {checkpoint} to {path}")
    return 0


def train(args):
    # pylint: disable=import-outside-toplevel
    import tensorflow as tf
    from tfnegcache_examples import movielens as experiment
    from tfnegcache.export import export_retrieval_model

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    data = _load(args.data_dir)
    written = []

    def on_model(strategy, seed, model, corpus):
        if not args.export or strategy != "negative-cache" or written:
            return
        movies = model.candidate_tower(corpus.movie_tensors())
        path = export_retrieval_model(
            model.query_tower, movies, corpus.movie_ids, k=min(100, corpus.num_movies),
            name="movielens_negative_cache", base_dir=args.export_dir, overwrite=True)
        written.append(f"{path} (the seed {seed} negative-cache model, a TF Serving "
                       "SavedModel)")
        # The towers only (no cache, no optimizer), for `python -m tfnegcache export`.
        checkpoint_dir = output / "checkpoints" / f"negative-cache-seed{seed}"
        tf.train.Checkpoint(query_tower=model.query_tower,
                            candidate_tower=model.candidate_tower).write(
                                str(checkpoint_dir / "towers"))
        data_dir = None if args.data_dir is None else str(Path(args.data_dir).resolve())
        (checkpoint_dir / "config.json").write_text(json.dumps(
            {"embedding_dim": args.embedding_dim, "data_dir": data_dir, "seed": seed}))
        written.append(f"{checkpoint_dir} (its towers, for `python -m tfnegcache export`)")
        results_paths.update(export=str(path), checkpoint=str(checkpoint_dir))

    results_paths = {"export": None, "checkpoint": None}
    start = time.perf_counter()
    results = experiment.run(
        data, split=args.split, strategies=args.strategies, seeds=args.seeds,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        dim=args.embedding_dim, temperature=args.temperature, cache_size=args.cache_size,
        num_negatives=args.num_negatives, cache_in_batch=args.cache_in_batch,
        verbose=args.verbose, on_model=on_model,
        log=lambda text: print(text, flush=True))
    results["config"]["command"] = " ".join(["python -m tfnegcache"] + sys.argv[1:])
    results["wall_seconds"] = time.perf_counter() - start
    results.update(results_paths)
    (output / "main_job.json").write_text(json.dumps(results, indent=1))
    experiment.plot(results, output / "recall_at_100.png")
    print()
    print(experiment.format_table(results))
    seeds = ", ".join(map(str, args.seeds))
    print(f"\nmean of seeds {seeds}; {args.split} split; {args.epochs} epochs; "
          f"total {results['wall_seconds']:.0f} s")
    for path in [f"{output / 'main_job.json'} (config, table, every run's metrics)",
                 f"{output / 'recall_at_100.png'} (held-out Recall@100 per epoch)"] + written:
        print(f"wrote {path}")
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    if args.command == "train":
        return train(args)
    if args.command == "cost":
        return cost(args)
    return export(args)


def cost(args):
    """`python -m tfnegcache cost MODULE:FUNCTION`: prints `tfnegcache.measure_cost`."""
    import importlib  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel
    sys.path.insert(0, os.getcwd())
    module_name, _, function = args.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        args.parser.error(f"cannot import {module_name!r} (MODULE of MODULE:FUNCTION): {error}")
    make = getattr(module, function, None)
    if not callable(make):
        args.parser.error(f"{module_name!r} has no function {function!r} (FUNCTION of "
                          f"MODULE:FUNCTION). Received: {args.target}")
    made = make()
    if not (isinstance(made, tuple) and len(made) == 2):
        args.parser.error(f"{args.target}() must return (model, batch). Received: "
                          f"{type(made).__name__}")
    import tfnegcache  # pylint: disable=import-outside-toplevel
    try:
        report = tfnegcache.measure_cost(*made, steps=args.steps, warmup=args.warmup)
    except ValueError as error:
        args.parser.error(str(error))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
