"""Translate raw sentences, one per line, with a trained model (an export file or a checkpoint).

    python launch/translate.py --model models/x.pt --to de < input.en > output.de
    python launch/translate.py --model runs/x/checkpoints --tag best --to en --from de --input in.de --output out.en

An export carries its SentencePiece model; a checkpoint needs its prepared data dir (megavac.json's
data_dir, or --data-dir), checked against the checkpoint's data fingerprint. Lines split on "\\n" only;
blank lines give empty translations; the output has one line per input line, in input order.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="export file, checkpoint root or tag folder")
    ap.add_argument("--tag", default=None, help="checkpoint root only: latest (default), best or step_N")
    ap.add_argument("--data-dir", default=None, help="checkpoint only: prepared data dir (default: megavac.json's)")
    ap.add_argument("--to", required=True, help="target language code, e.g. de")
    ap.add_argument("--from", dest="src", default=None, help="source language code, when --to alone is ambiguous")
    ap.add_argument("--input", default="-", help="input file, UTF-8, one sentence per line (default: stdin)")
    ap.add_argument("--output", default="-", help="output file (default: stdout)")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--lenpen", type=float, default=1.0)
    ap.add_argument("--max-len-a", type=float, default=1.2)
    ap.add_argument("--max-len-b", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=4000, help="padded source tokens per batch")
    ap.add_argument("--batch-size", type=int, default=None, help="at most this many sentences per batch")
    ap.add_argument("--buffer-size", type=int, default=10_000,
                    help="lines read before translating them (sorted by length within); 1 for interactive use")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar on stderr (default: when stderr is a terminal)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        run(args)
    except ValueError as e:  # user errors: one line, no traceback
        sys.exit(f"translate.py: error: {e}")
    except BrokenPipeError:  # `... | head`: the reader is gone
        sys.stderr.close()


def run(args):
    import torch
    from rich.console import Console

    from megavac.evaluation.export import count_lines, load_translator, translate_stream
    from megavac.evaluation.generate import SearchConfig

    if args.buffer_size < 1:
        raise ValueError(f"--buffer-size must be >= 1, got {args.buffer_size}")
    if args.input != "-" and not Path(args.input).is_file():
        raise ValueError(f"--input {args.input} does not exist or is not a file")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    search = SearchConfig(beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's logger and consolidation print: keep stdout clean
        translator = load_translator(args.model, args.tag, args.data_dir, device, search)
    task = translator.task(args.to, args.src)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    total = None if args.input == "-" or not show else count_lines(args.input)
    name = "stdin" if args.input == "-" else args.input
    with open_input(args.input) as src, open_output(args.output) as out, \
            progress_bar(show, Console(stderr=True)) as bar:
        translate_stream(translator, task, src, out, name, args.buffer_size, args.max_tokens, args.batch_size,
                         bar(task["name"], total))


@contextlib.contextmanager
def _open(path, mode: str, std, flag: str):
    """``path`` opened in binary ``mode`` (``std`` for "-"); an OSError becomes a ValueError naming the flag."""
    if path == "-":
        yield std.buffer
        return
    try:
        if "w" in mode:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        f = open(path, mode)
    except OSError as e:
        raise ValueError(f"cannot {'write' if 'w' in mode else 'read'} {flag} {path}: {e.strerror}") from None
    with f:
        yield f


def open_input(path):
    return _open(path, "rb", sys.stdin, "--input")


def open_output(path):
    return _open(path, "wb", sys.stdout, "--output")


@contextlib.contextmanager
def progress_bar(show: bool, console):
    """A factory ``bar(name, total) -> advance(n)`` (or None when not shown), rich on stderr."""
    if not show:
        yield lambda name, total: None
        return
    from megavac.evaluation.evaluate import make_progress

    with make_progress(console) as progress:
        def bar(name, total):
            tid = progress.add_task(name, total=total)
            return lambda n: progress.advance(tid, n)

        yield bar


if __name__ == "__main__":
    main()
