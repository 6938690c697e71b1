"""Command line: parses flags and calls flaxlab; every bad input is one line on stderr and exit code 2.

  python -m experiments list
  python -m experiments show mnist_cnn --optimizer.lr=0.05
  python -m experiments run mnist_cnn --seeds 3 --data-dir ../shared/data
  python -m experiments sweep mnist_cnn --grid dropout=0,0.1,0.2 --seeds 3
  python -m experiments bench mnist_cnn --peer
"""
import argparse
import json
import os
import signal
import sys
from pathlib import Path

from flaxlab import parallel
from flaxlab.errors import UsageError, did_you_mean


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage; one line is enough
        command = self.prog.split()[-1]
        where = "" if command == "experiments" else " " + command
        raise UsageError(f"{message} (see `python -m experiments{where} --help`)")


def _silence_stdout():
    """What was piped into has closed (`| head`): the rest of the output goes nowhere, quietly."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _log(*args):
    """A run's line, flushed; once the reader of a pipe has gone, the run goes on silently to its end."""
    try:
        print(*args, flush=True)
    except BrokenPipeError:
        _silence_stdout()


def _experiment(name):
    from experiments import EXPERIMENTS
    if name not in EXPERIMENTS:
        raise UsageError(f"unknown experiment '{name}'{did_you_mean(name, EXPERIMENTS)}; known: "
                         f"{', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]()


def _full_name(config, key):
    """An option by its dotted name or, as --grid takes it, a unique last part: --lr is --optimizer.lr."""
    from flaxlab import config as config_lib
    if key.startswith("model."):  # a swapped-in network's options are resolved by override
        return key
    matches = config_lib.fields_named(config, key)
    if len(matches) > 1:
        raise UsageError(f"--{key} is ambiguous: {', '.join('--' + k for k in matches)}")
    return matches[0] if matches else key  # an unknown one is override's to report


def _check_other_commands_options(args, overrides):
    """An option of another command, or misspelt, said as such (it was "unknown option '--data_dir'" and 45
    options)."""
    for token in overrides:  # sweep's and bench's parsers take --grid, and those reading data --data-dir
        option = token[2:].partition("=")[0] if token.startswith("--") else ""
        if option == "grid":
            raise UsageError("--grid: a grid of variants is sweep's: "
                             "python -m experiments sweep NAME --grid FIELD=V1,V2")
        if option.replace("-", "_") == "data_dir":
            raise UsageError(f"--{option}: the option is spelt --data-dir"
                             if hasattr(args, "data_dir") else
                             "--data-dir: this command reads no data (run, sweep, bench, evaluate and figures "
                             "take it)")


def _override_pairs(config, tokens):
    """(dotted field, value) for each `--key=value` or `--key value`, the key by its full name."""
    from flaxlab.models import MODELS, network_options
    pairs, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise UsageError(f"unexpected argument '{token}'")
        if "=" in token:
            key, value = token[2:].split("=", 1)
        elif i + 1 < len(tokens):
            key, value = token[2:], tokens[i + 1]
            i += 1
        else:
            raise UsageError(f"option {token} needs a value")
        pairs.append((key.replace("-", "_"), value))
        i += 1
    network = next((value for key, value in pairs if key == "model.name"), None)
    if network in MODELS:  # the network swapped in takes its options by their last part too: --hidden 64
        named = {**config, "model": {**network_options(network), **config["model"]}}
        pairs = [(_full_name(named, key), value) for key, value in pairs]
    else:
        pairs = [(_full_name(config, key), value) for key, value in pairs]
    return pairs


def _apply_overrides(config, tokens):
    """`--key=value` or `--key value` for any (dotted) config field. `--model.name` comes first: the network
    it swaps in takes its own `--model.*` options, and the experiment's network options it does not take
    are dropped (unless given: make_model refuses those)."""
    from flaxlab import config as config_lib
    from flaxlab.models import MODELS, network_options, with_option_default
    pairs = _override_pairs(config, tokens)
    before, given = config, {key for key, _ in pairs}
    for key, value in sorted(pairs, key=lambda pair: pair[0] != "model.name"):
        name, option = config["model"].get("name"), key.partition("model.")[2]
        config = {**config, "model": with_option_default(config["model"], option)}
        if option and option not in config["model"] and name in MODELS:  # another network's option
            takers = sorted(n for n in MODELS if option in network_options(n))
            if takers:
                raise UsageError(f"--model.{option} is an option of {', '.join(takers[:4])}"
                                 f"{', ...' if len(takers) > 4 else ''}, not of {name}: give --model.name too")
        config = config_lib.override(config, key, value)
        if key == "model.name":
            config_lib.validate(config)  # an unknown network is the error to report, not its options
    return config_lib.validate(config_lib.drop_unused(config, before, given))


CONFIG_OPTIONS = ("Every field of the experiment's config is an option too, by its dotted name: --epochs 5, "
                  "--seeds 3, --batch-size 64, --optimizer.lr 0.05, --model.features 8,16,32, --data.val_fraction "
                  "0.1, --augment.crop 4, or by a unique last part: --lr 0.05, --dropout 0.2. "
                  "`python -m experiments show NAME` prints them all with their values.")


def _parser():
    parser = _Parser(prog="python -m experiments", description=__doc__, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from flaxlab import __version__
    parser.add_argument("--version", action="version", version=f"flaxlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="the experiments and what they reproduce", allow_abbrev=False)
    show = sub.add_parser("show", help="print an experiment's config (after overrides) as JSON", allow_abbrev=False,
                          epilog=CONFIG_OPTIONS)
    run = sub.add_parser("run", allow_abbrev=False, epilog=CONFIG_OPTIONS,
                         help="train an experiment; any config field is an option: --optimizer.lr 0.05, --seeds 3")
    sweep = sub.add_parser("sweep", allow_abbrev=False, epilog=CONFIG_OPTIONS,
                           help="train variants of an experiment (its own sweep, or --grid) side by side; "
                                "a table over seeds and one comparison figure")
    for command in (show, run, sweep):
        command.add_argument("experiment", help="its name (python -m experiments list)")
    sweep.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                       help="a field (dotted, or its last part) and its values; several --grid make a product; "
                            "a list field separates values with /: --grid model.features=8,16/16,32")
    for command in (run, sweep):
        command.add_argument("--resume", action="store_true",
                             help="continue the run in --workdir from its last checkpoint (--checkpoint_every N); "
                                  "a sweep after the programs it finished")
        command.add_argument("--data-dir", help="folder with the data files (MNIST: the IDX files; CIFAR-10, "
                                                "GTSRB: their archives or folders); default: the shipped sample")
        command.add_argument("--workdir", help="run folder (default runs/NAME-TIMESTAMP)")
        command.add_argument("--quiet", action="store_true", help="print only the final table and any warning")
    summary = sub.add_parser("summary", allow_abbrev=False,
                             help="a network's layers, output shapes and parameter counts (Keras-style)")
    summary.add_argument("model", help="a model (e.g. tdt4265_cnn, gtsrb_cnn) or an experiment (e.g. mnist_cnn)")
    summary.add_argument("--input-shape", help="H,W,C without the batch (default: what the report fed it)")
    summary.add_argument("--num-classes", type=int, help="default: the report's")
    layers = sub.add_parser("layers", allow_abbrev=False,
                            help="check every from-scratch layer against the framework (max abs difference)")
    layers.add_argument("--seed", type=int, default=0)
    figures = sub.add_parser("figures", allow_abbrev=False,
                             help="draw a run's first-layer filters and a layer's feature maps (and, for "
                                  "segmentation, the predicted mask) from its checkpoint")
    figures.add_argument("--workdir", required=True, help="the run folder (its last checkpoint)")
    figures.add_argument("--layer", default="", help="e.g. Conv_1 or Activation_2 (default: the first conv)")
    figures.add_argument("--image", type=int, default=0, help="index of the test image")
    figures.add_argument("--data-dir", help="the data to draw from (default: the files the run read, as its "
                                            "history.json says)")
    evaluate = sub.add_parser("evaluate", allow_abbrev=False,
                              help="score a run's kept (best-validation) state on its val and test splits again")
    evaluate.add_argument("--workdir", required=True, help="the run folder (its last checkpoint)")
    evaluate.add_argument("--flip", action="store_true",
                          help="average the logits of each image and its left-right mirror (as --eval_flip true)")
    evaluate.add_argument("--data-dir", help="the data to score (default: the files the run read, as its "
                                             "history.json says)")
    predict = sub.add_parser("predict", allow_abbrev=False,
                             help="label your own image files with a run's kept state (classes, or masks)")
    predict.add_argument("images", nargs="+", help="image files, or folders of them")
    predict.add_argument("--workdir", required=True, help="the run folder (its last checkpoint)")
    predict.add_argument("--top", type=int, help="classes shown per image, most probable first (default 3)")
    predict.add_argument("--invert", action="store_true",
                         help="255 - pixel: MNIST's digits are light on dark, a pen's on paper dark on light")
    predict.add_argument("--out", help="a segmentation run's masks go here (default: WORKDIR/predicted-masks)")
    compare = sub.add_parser("compare", allow_abbrev=False,
                             help="runs trained apart side by side: a table over them and their curves in one figure")
    compare.add_argument("runs", nargs="+", help="run folders (a sweep's folder adds each of its variants)")
    compare.add_argument("--out", help="where the table and figure go (default runs/compare-TIMESTAMP)")
    runs = sub.add_parser("runs", allow_abbrev=False,
                          help="the run folders in runs/ (or FOLDER): experiment, epochs, finished or where --resume "
                               "goes on, final test score")
    runs.add_argument("folder", nargs="?", default="runs", help="a folder of run folders, or one run folder")
    bench = sub.add_parser("bench", help="steps/s, images/s and compile time as JSON lines, vs the PyTorch peer",
                           epilog=CONFIG_OPTIONS,
                           allow_abbrev=False)
    bench.add_argument("experiment", help="a workload: mnist_cnn, mnist_fnn or any experiment; `all`: every "
                                          "workload the peer runs (with --peer)")
    bench.add_argument("--markdown", help="with --peer: also write the results as a Markdown table to this file")
    bench.add_argument("--epochs", type=int, default=1, help="epochs each side trains (default 1; not the "
                                                             "experiment's own)")
    bench.add_argument("--data-dir", help="default: ../shared/data when present, else the shipped sample")
    bench.add_argument("--peer", action="store_true", help="also run ../shared/peers/torch_reference.py and compare")
    bench.add_argument("--as-peer-runs", action="store_true",
                       help="train the workload as the PyTorch peer does (no augmentation, constant learning rate, "
                            "no validation split): flaxlab's side of --peer")
    bench.add_argument("--repeat", type=int, default=1,
                       help="alternate flaxlab and the peer this many times (a shared machine's speed drifts)")
    bench.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                       help="bench a sweep: stacked programs against every model trained alone, one after another "
                            "(an experiment that defines a sweep is benched this way without --grid)")
    return parser


def _check_options(name, config, variants, sweep):
    """Refuses an option that the run would not honour, silently: one that every variant of a sweep sets (the
    sweep's values replace it), one that a sweep ignores (feature maps), and MNIST's
    `--data.test_fraction` (its test split is its own)."""
    from flaxlab import config as config_lib
    from flaxlab.sweep import IGNORED_BY_SWEEP
    given = config_lib.changed_fields(_experiment(name), config)
    for key in given:
        if variants and all(key in v for v in variants):
            raise UsageError(f"--{key} is what the sweep varies (every variant sets it): leave it out, or give "
                             f"the values to try with --grid {key}=V1,V2")
        why = IGNORED_BY_SWEEP.get(key.split(".")[0])
        if sweep and why:
            raise UsageError(f"--{key}: {why}; set it on a single run of the variant you want (`run` of an "
                             f"experiment without variants, with the variant's options)")
    if ("model.weights" in given and not config["model"].get("pretrained")
            and not any(v.get("model.pretrained") for v in variants)):  # it trained from random weights, unsaid
        raise UsageError("--model.weights: this run starts from random weights (--model.pretrained false), so it "
                         "would not read them: give --model.pretrained true too, or leave --model.weights out")
    if "data.test_fraction" in set(given).union(*variants) and config["data"]["name"] == "mnist":
        raise UsageError("--data.test_fraction: MNIST has its own test split, so nothing is held out of train as "
                         "test (--data.val_fraction holds out a validation split)")


def _split_cpu(config, variants):
    """One CPU device per model that XLA:CPU would train one after another (parallel.split_cpu_devices), as
    many as a sweep's largest program stacks (its programs train one after another: a sweep over widths, four
    programs of one model, made four devices that slowed its one)."""
    from flaxlab import sweep
    from flaxlab.train import resolve_model_axis
    models = config["seeds"] * (max(len(p.variants) for p in sweep.plan(config, variants)) if variants else 1)
    sequential = resolve_model_axis(config.get("model_axis", "auto"), models, "cpu") == "sequential"
    parallel.split_cpu_devices(models if sequential else 1, config["distributed"])


def _run(args, overrides):
    """`run` trains one experiment; an experiment that defines variants, or `sweep`, trains a sweep."""
    from flaxlab import sweep
    from flaxlab.runner import run_experiment
    config = _apply_overrides(_experiment(args.experiment), overrides)
    variants = sweep.parse_grid(config, args.grid) if getattr(args, "grid", None) else list(config["sweep"])
    is_sweep = args.command == "sweep" or bool(variants)
    _check_options(args.experiment, config, variants, is_sweep)
    _split_cpu(config, variants)
    parallel.set_up_process(config["distributed"], config["deterministic"])
    primary = parallel.is_primary()  # in a multi-host run, process 0 speaks for all
    silent = lambda *a: None  # noqa: E731
    report = (lambda line: _log(line.lstrip())) if args.quiet else _log  # --quiet: the table, no blank line first
    kwargs = dict(workdir=args.workdir, data_dir=args.data_dir, progress=primary and not args.quiet,
                  log=_log if primary and not args.quiet else silent, report=report if primary else silent)
    if is_sweep:
        sweep.run_sweep(config, variants, resume=args.resume, **kwargs)
    else:
        run_experiment(config, resume=args.resume, **kwargs)


def _bench(args, overrides):
    from flaxlab import bench, sweep
    if args.epochs < 1 or args.repeat < 1:
        raise UsageError("--epochs and --repeat must be at least 1")
    if args.markdown:
        from flaxlab.runner import unwritable
        why = unwritable(Path(args.markdown).parent) or (Path(args.markdown).is_dir() and "it is a folder")
        if why:
            raise UsageError(f"--markdown {args.markdown}: {why}")
    names = list(bench.PEER_WORKLOADS) if args.experiment == "all" else [args.experiment]
    configs = {name: _apply_overrides(_experiment(name), overrides) for name in names}
    if args.peer:
        for name, config in configs.items():
            bench.check_peer_overrides(_experiment(name), config)
    first = configs[names[0]]
    variants = sweep.parse_grid(first, args.grid) if args.grid else list(first["sweep"])
    _check_options(names[0], first, variants, sweep=False)  # a bench keeps no checkpoints, draws no figures
    if not args.peer:  # with the peer, each workload's flaxlab side runs in a process of its own
        _split_cpu(first, variants)
    parallel.set_up_process(first["distributed"], first["deterministic"])
    shared = bench.shared_dir()
    data_dir = args.data_dir or (shared / "data" if shared else None)
    if (args.peer or args.markdown) and not shared:
        raise UsageError("--peer needs ../shared (with peers/ and data/) beside the repository, or $FLAXLAB_SHARED "
                         "(or $FLAXLAB_SHARED_DATA naming its data/)")
    if (args.experiment == "all" or args.markdown) and not args.peer:
        raise UsageError("bench all and --markdown compare with the peer: add --peer")
    if args.peer:  # before flaxlab's side runs and prints its rows
        bench.check_peer_data(args.data_dir, shared)
        for config in configs.values():
            bench.peer_script(bench.peer_workload(config)[0], shared)
    emit = lambda row: parallel.is_primary() and print(json.dumps(row), flush=True)  # a multi-host bench: once
    if variants and args.experiment != "all":
        if args.peer:
            raise UsageError("--peer compares one experiment; a sweep is benched against itself, model by model")
        for _ in range(args.repeat):
            emit(bench.bench_sweep(first, variants, data_dir, epochs=args.epochs))
        return
    if not args.peer:
        config = bench.peer_workload(first)[1] if args.as_peer_runs else first
        for _ in range(args.repeat):
            emit(bench.bench_flaxlab(config, data_dir, epochs=args.epochs))
        return
    warn = lambda line: parallel.is_primary() and print(line, file=sys.stderr)  # noqa: E731
    results = {name: bench.bench_against_peer(name, config, overrides, data_dir, shared, args.epochs, args.repeat, emit,
                                              warn) for name, config in configs.items()}
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(bench.markdown_table(results, args.epochs, overrides))
        os.replace(tmp, path)
        print(f"wrote {path}", file=sys.stderr)


def _summary(args, overrides):
    """One table, or one per distinct network of an ablation whose variants change it (ai604_cnn_bn's two
    networks, mnist_cnn_widths' four); variants with the same table share it."""
    from experiments import EXPERIMENTS
    from flaxlab import config as config_lib
    from flaxlab import models, sweep
    if args.model in EXPERIMENTS:
        config = _apply_overrides(_experiment(args.model), overrides)
        changed = config_lib.changed_fields(_experiment(args.model), config)
        for key, _ in _override_pairs(_experiment(args.model), overrides):  # given, if only its default
            if not key.startswith("model.") and key != "data.size":
                raise UsageError(f"--{key} does not change the model: summary takes --model.* options and "
                                 f"--data.size (or --input-shape)")
        if "data.size" in changed and args.input_shape:
            raise UsageError("give --input-shape or --data.size, not both")
        variants = [v for v in config["sweep"] if not set(v) & set(changed)]  # an option given beats the sweep
        configs = {sweep.variant_label(v): sweep.variant_config(config, v) for v in variants} or {"": config}
        tables = {}
        for label, each in configs.items():
            table = _summary_table(args, each["model"], each["data"]["size"],
                                   f"{args.model} ({label})" if len(configs) > 1 else args.model)
            tables.setdefault(table, []).append(label)
        for table, labels in tables.items():
            variant = f" ({'; '.join(labels)})" if len(tables) > 1 else ""
            print(table.replace(f"{args.model}, input", f"{args.model}{variant}, input", 1))
        return
    if args.model not in models.MODELS:
        known = sorted(set(models.MODELS) | set(EXPERIMENTS))
        raise UsageError(f"unknown model or experiment '{args.model}'{did_you_mean(args.model, known)}; known: "
                         f"{', '.join(known)}")
    if overrides and overrides[0].startswith("--model."):  # was "unexpected argument"
        using = [name for name, make in EXPERIMENTS.items() if make()["model"]["name"] == args.model][:2]
        example = f" (e.g. `summary {using[0]} {' '.join(overrides[:2])}`)" if using else ""
        raise UsageError(f"{overrides[0]}: a network by its name is shown with its defaults; --model.* options go "
                         f"with an experiment that trains it{example}")
    if overrides:
        raise UsageError(f"unexpected argument '{overrides[0]}'")
    print(_summary_table(args, {"name": args.model}, ()))


def _summary_table(args, model_config, size, name=None):
    """The Keras-style table of a network on its report's input (resized to an experiment's --data.size), or
    --input-shape; `name` is what an error calls it (an ablation's variant)."""
    from flaxlab import models, summary
    name = name or args.model
    input_shape, num_classes = models.REPORT_INPUTS.get(model_config["name"], (None, 10))
    if size and input_shape:
        input_shape = (*size, input_shape[2])
    option = f"--data.size {','.join(map(str, size))}" if size else ""  # what to name in an error
    if args.input_shape is not None:
        option = f"--input-shape {args.input_shape}"
        try:
            input_shape = tuple(int(d) for d in args.input_shape.split(","))
        except ValueError:
            raise UsageError(f"bad --input-shape '{args.input_shape}': expected H,W,C such as 32,32,3") from None
    if not input_shape:
        raise UsageError(f"{name} has no report input to show it on: give --input-shape H,W,C")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise UsageError(f"--input-shape must be H,W,C with positive sizes, got {args.input_shape}")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError("--num-classes must be positive")
    model = models.make_model(model_config, args.num_classes or num_classes)
    try:
        table = summary.summarize_model(model, input_shape)
    except Exception as e:  # only a user's shape can fail here, e.g. one too small for the net's pools
        from flaxlab.runner import SHAPE_ERRORS, shape_error_gist, size_hint
        if not option and not isinstance(e, SHAPE_ERRORS):  # a network's own bug: its traceback
            raise
        taken = option or f"{input_shape[0]}x{input_shape[1]} images"  # the network's options shrank them
        hint = size_hint(model, input_shape, (option or "--data.size").split()[0], with_channels=bool(args.input_shape))
        raise UsageError(f"{name} cannot take {taken}: {shape_error_gist(e)}{hint}") from None
    inside = getattr(model, "input_size", 0)  # ImageNet networks resize their input (a conv1 of 112x112 from 32x32)
    resized = (f" (resized to {inside}x{inside} inside the network)" if inside and input_shape[:2] != (inside,) * 2
               else "")
    return summary.format_summary(table, title=f"{args.model}, input {'x'.join(map(str, input_shape))}{resized}")


def _layers(args):
    from flaxlab import layers
    if args.seed < 0:
        raise UsageError(f"--seed must not be negative, got {args.seed}")
    cases = layers.comparison_cases(args.seed)
    skipped = [f"{case} (needs {case.needs})" for case in cases if not case.available()]
    cases = [case for case in cases if case.available()]
    print(f"{'layer':28s} {'case':40s} {'max |diff|':>11s} {'grad max |diff|':>16s}")
    worst = 0.0
    for case in cases:
        row = case.run(args.seed)
        grad = row["grad_max_abs_diff"]
        print(f"{row['layer']:28s} {row['case'][:40]:40s} {row['max_abs_diff']:11.2e} "
              f"{grad:16.2e}", flush=True)
        worst = max(worst, row["max_abs_diff"], grad)
    print(f"{len(cases)} comparisons, largest difference {worst:.2e}")
    if skipped:
        print(f"skipped {len(skipped)}, without their reference installed: {', '.join(skipped)}")


_TERMINATED = []  # the SIGTERM that stopped this process, if one did


def stop_on_sigterm():
    """SIGTERM (a batch system's time limit, `timeout`, a stopped notebook kernel) ends a run as Ctrl-C does: it
    says what its folder holds and how to go on (it died without a word, its training marker left). Set by the
    process's entry point (experiments/__main__.py), and only over the default handler: not over one that
    ignores the signal or another framework's; a second SIGTERM kills at once."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _TERMINATED.append(signum)
        raise KeyboardInterrupt
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


def main(argv=None):
    try:
        args, overrides = _parser().parse_known_args(argv)
        _check_other_commands_options(args, overrides)
        if overrides and args.command in ("list", "figures", "evaluate", "predict", "layers", "compare", "runs"):
            raise UsageError(f"unexpected argument '{overrides[0]}'")
        for option in ("workdir", "data_dir", "out", "markdown"):  # '--workdir=' (an unset shell variable)
            if getattr(args, option, None) == "":
                what = "file" if option == "markdown" else "folder"
                raise UsageError(f"--{option.replace('_', '-')} is empty: give a {what}")
        if args.command in ("summary", "layers", "figures", "evaluate", "predict"):  # run, sweep, bench: set_up_process
            parallel.check_backend()
        if args.command == "list":
            from experiments import EXPERIMENTS
            for name, make in sorted(EXPERIMENTS.items()):
                print(f"{name:24s} {make()['description']}")
        elif args.command == "show":
            config = _apply_overrides(_experiment(args.experiment), overrides)
            _check_options(args.experiment, config, list(config["sweep"]), sweep=bool(config["sweep"]))  # as `run`
            print(json.dumps(config, indent=1))
        elif args.command in ("run", "sweep"):
            _run(args, overrides)
        elif args.command == "bench":
            _bench(args, overrides)
        elif args.command == "summary":
            _summary(args, overrides)
        elif args.command == "figures":
            from flaxlab.runner import draw_from_checkpoint
            draw_from_checkpoint(args.workdir, args.data_dir, args.layer, args.image, log=_log)
        elif args.command == "evaluate":
            from flaxlab.runner import evaluate_checkpoint
            evaluate_checkpoint(args.workdir, args.data_dir, args.flip, log=_log)
        elif args.command == "predict":
            from flaxlab.runner import predict_images
            predict_images(args.workdir, args.images, args.top, args.invert, args.out, log=_log)
        elif args.command == "layers":
            _layers(args)
        elif args.command == "compare":
            from flaxlab.compare import compare_runs
            compare_runs(args.runs, args.out, log=_log)
        elif args.command == "runs":
            from flaxlab.compare import list_runs
            print(list_runs(args.folder))
        return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a run or sweep says what its folder holds
        print(f"{'terminated' if _TERMINATED else 'interrupted'}{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 143 if _TERMINATED else 130  # as a shell reports SIGTERM's and SIGINT's
    except BrokenPipeError:  # `list | head`: the reader has what it wanted
        _silence_stdout()
        return 141  # as a process ended by SIGPIPE
