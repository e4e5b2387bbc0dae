"""`python -m tfnegcache train`: the MovieLens comparison of negative strategies.

Run `python -m tfnegcache train --help` for the options.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import tfnegcache  # noqa: F401  first: selects Keras 2 before TensorFlow loads


def _seeds(text):
    return [int(s) for s in text.split(",") if s.strip()]


def _strategies(text):
    from tfnegcache.experiments.movielens import STRATEGIES  # pylint: disable=import-outside-toplevel
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"strategies must be a comma list of {STRATEGIES}")
    return names


def build_parser():
    parser = argparse.ArgumentParser(
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
            "towers to <output-dir>/checkpoints/negative-cache-seed<N> (for `export`)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--seeds", "--seed", type=_seeds, default=[0, 1, 2],
                       help="comma-separated seeds (model init, shuffling, cache draws); the "
                            "table reports their mean")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--learning-rate", type=float, default=0.1, help="Adagrad learning rate")
    train.add_argument("--embedding-dim", type=int, default=32)
    train.add_argument("--temperature", type=float, default=1.0)
    train.add_argument("--cache-size", type=int, default=2048,
                       help="negative cache slots (>= 1682 holds every movie)")
    train.add_argument("--num-negatives", type=int, default=8,
                       help="negatives drawn from the cache per query per step")
    train.add_argument("--cache-with-in-batch", dest="cache_in_batch", action="store_true",
                       help="negative cache: also use in-batch negatives (default: the softmax "
                            "is over [positive, cache], which with the whole table cached is "
                            "the full softmax; in-batch negatives would count popular movies "
                            "once per occurrence in the batch)")
    train.add_argument("--strategies", type=_strategies,
                       default="in-batch,in-batch-logq,full-softmax,negative-cache",
                       help="comma-separated subset of in-batch,in-batch-logq,full-softmax,"
                            "negative-cache")
    train.add_argument("--split", choices=("tutorial", "temporal"), default="tutorial",
                       help="tutorial: random 80,000/20,000; temporal: each user's last "
                            "rating held out")
    train.add_argument("--data-dir", default=None,
                       help="MovieLens 100k directory (GroupLens or RecBole layout); default: "
                            "the cache, then TFDS, then the RecBole wheel")
    train.add_argument("--output-dir", default="results")
    train.add_argument("--export-dir", default="saved_models",
                       help="base directory of the exported SavedModel")
    train.add_argument("--no-export", dest="export", action="store_false")
    train.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                       help="Keras fit verbosity: 1 progress bars, 2 one line per epoch, 0 quiet")
    export = sub.add_parser(
        "export",
        help="export a checkpoint written by train as a TF Serving SavedModel",
        description=(
            "Rebuild the towers of a checkpoint written by `train` "
            "(<output-dir>/checkpoints/negative-cache-seed<N>), encode every movie with the "
            "candidate tower and write <export-dir>/<name>/<version>/: user_id -> top-k movie "
            "ids and scores (brute force)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    export.add_argument("checkpoint", help="checkpoint directory written by train")
    export.add_argument("--data-dir", default=None,
                        help="MovieLens directory; default: the one train used")
    export.add_argument("--k", type=int, default=100)
    export.add_argument("--export-dir", default="saved_models")
    export.add_argument("--name", default="movielens_negative_cache")
    export.add_argument("--version", type=int, default=1)
    return parser


def export(args):
    # pylint: disable=import-outside-toplevel
    import numpy as np
    import tensorflow as tf
    from tfnegcache.datasets import movielens
    from tfnegcache.experiments import movielens as experiment
    from tfnegcache.export import export_retrieval_model

    checkpoint = Path(args.checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    data = movielens.load(data_dir=args.data_dir or config["data_dir"])
    # The towers' vocabularies come from all ratings and movies, whatever the split.
    corpus = experiment.Corpus(data, np.arange(len(data.ratings["user_id"])),
                               np.zeros([0], np.int64))
    query_tower = experiment.query_tower(corpus.users, config["embedding_dim"])
    candidate_tower = experiment.CandidateTower(
        corpus.num_movies, len(corpus.vocab), config["embedding_dim"])
    query_tower(tf.constant(corpus.users[:1]))
    movies = candidate_tower(corpus.movie_tensors())  # builds the variables, then restore
    tf.train.Checkpoint(query_tower=query_tower, candidate_tower=candidate_tower).read(
        str(checkpoint / "towers")).assert_existing_objects_matched()
    movies = candidate_tower(corpus.movie_tensors())
    path = export_retrieval_model(
        query_tower, movies, corpus.movie_ids, k=args.k, name=args.name,
        version=args.version, base_dir=args.export_dir)
    print(f"exported {checkpoint} to {path}")
    return 0


def train(args):
    # pylint: disable=import-outside-toplevel
    from tfnegcache.datasets import movielens
    from tfnegcache.experiments import movielens as experiment
    from tfnegcache.export import export_retrieval_model
    import tensorflow as tf

    if isinstance(args.strategies, str):
        args.strategies = _strategies(args.strategies)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    data = movielens.load(data_dir=args.data_dir)
    exported = {}

    def on_model(strategy, seed, model, corpus):
        if not args.export or strategy != "negative-cache" or exported:
            return
        movies = model.candidate_tower(corpus.movie_tensors())
        path = export_retrieval_model(
            model.query_tower, movies, corpus.movie_ids, k=min(100, corpus.num_movies),
            name="movielens_negative_cache", base_dir=args.export_dir)
        exported["path"] = str(path)
        print(f"exported the negative-cache model (seed {seed}) to {path}", flush=True)
        # The towers only (no cache, no optimizer), for `python -m tfnegcache export`.
        checkpoint_dir = output / "checkpoints" / f"negative-cache-seed{seed}"
        tf.train.Checkpoint(query_tower=model.query_tower,
                            candidate_tower=model.candidate_tower).write(
                                str(checkpoint_dir / "towers"))
        (checkpoint_dir / "config.json").write_text(json.dumps(
            {"embedding_dim": args.embedding_dim, "data_dir": args.data_dir, "seed": seed}))
        exported["checkpoint"] = str(checkpoint_dir)

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
    results["export"] = exported.get("path")
    results["checkpoint"] = exported.get("checkpoint")
    (output / "main_job.json").write_text(json.dumps(results, indent=1))
    experiment.plot(results, output / "recall_at_100.png")
    print()
    print(experiment.format_table(results))
    print(f"\n(mean of seeds {args.seeds}; {args.split} split; {args.epochs} epochs; total "
          f"{results['wall_seconds']:.0f} s)  wrote {output / 'main_job.json'}, "
          f"{output / 'recall_at_100.png'}" + (f", {exported['path']}" if exported else ""))
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train(args)
    if args.command == "export":
        return export(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
