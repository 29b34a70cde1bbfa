"""Fuzzes the OTLP decoders against each other: coverage-guided with atheris (libFuzzer), or
with a Hypothesis loop where atheris does not install.

    make fuzz FUZZ_SECONDS=120                             # atheris, compiled decoder under ASan/UBSan
    python fuzz/decode_fuzz.py -max_total_time=300         # libFuzzer flags; corpus in fuzz/corpus
    python fuzz/decode_fuzz.py --fallback --examples 5000  # no atheris: Hypothesis instead
    python fuzz/decode_fuzz.py --replay fuzz/corpus        # every input of a corpus, once; no atheris

Every input goes to protobuf's ``ParseFromString``, to the Python decoder and to the compiled
one (``tests/test_fastdecode.py``'s ``check_same``), once without limits and once under the
receiver's limits (latest end time, longest value kept). They must agree: the same Batch, or
all three refuse the bytes; and nothing but ``MalformedRequest`` may be raised. Anything else
is a finding: atheris stops and saves the input as ``crash-<sha1>`` (replay it with
``python fuzz/decode_fuzz.py --replay crash-<sha1>``). Atheris measures coverage of the Python
code (``processor``: the Python decoder, keying). The compiled decoder as ``make install``
builds it is not instrumented; ``make fuzz`` builds it with AddressSanitizer and with
comparison tracing, so that its comparisons guide the search too (``-use_value_profile=1``)
and a read past a buffer is a crash, not a silent wrong answer; ``make test-sanitize``
replays the corpus under AddressSanitizer and UndefinedBehaviorSanitizer (docs/testing.md).

Seeds (written to the corpus directory when it is empty): the test builders' requests,
scrambled encodings of them and a request with links, statuses and entity refs.

Not collected by pytest (it is outside tests/); tests/test_fastdecode.py runs its fallback
and its replay briefly so that they keep working.
"""

from __future__ import annotations

import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LIMITS = {"max_attribute_length": 4}  # and max_end_ns, set below from the seeds' time


def seeds() -> list[bytes]:
    from tests import test_fastdecode as tf
    from tests.otlp import encoded, request

    out = [encoded(spans) for _, spans in sorted(tf.BUILDER_CASES.items())]
    out.append(tf._valid_request_bytes())
    for seed, (_, spans) in enumerate(sorted(tf.BUILDER_CASES.items())):
        out.append(tf.Scrambler(random.Random(seed), 0.3).encode(request(spans)))
    return out


def make_check():
    from tests import test_fastdecode as tf

    limits = dict(LIMITS, max_end_ns=tf.T + 2)
    runs = [0]

    def one_input(data: bytes) -> None:
        runs[0] += 1
        tf.check_same(data)
        tf.check_same(data, **limits)

    return one_input, runs


def write_seeds(corpus: str) -> None:
    """Puts the seeds in corpus when it holds nothing yet."""
    os.makedirs(corpus, exist_ok=True)
    if not os.listdir(corpus):
        for i, data in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed-{i:03d}"), "wb") as f:
                f.write(data)


def fuzz_with_atheris(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["processor"]):
        import processor.pipeline.location  # noqa: F401 (instrumented for coverage)
        import processor.receiver.decode  # noqa: F401
    one_input, _ = make_check()
    paths = [a for a in argv[1:] if not a.startswith("-")]
    if not paths:  # no corpus given: ours
        paths = [os.path.join(ROOT, "fuzz", "corpus")]
        argv = argv + paths
    if not os.path.isfile(paths[0]):  # the first directory is where libFuzzer writes
        write_seeds(paths[0])
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def replay(paths: list[str]) -> int:
    """The seeds and every file under paths (files or directories; missing ones are
    skipped), each once through the check: for the sanitizer run and for crash files."""
    one_input, runs = make_check()
    for data in seeds():
        one_input(data)
    for path in paths:
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        for name in files:
            with open(name, "rb") as f:
                data = f.read()
            try:
                one_input(data)
            except BaseException:
                print(f"decode_fuzz: {name} fails", file=sys.stderr)
                raise
    return runs[0]


def fuzz_with_hypothesis(examples: int) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.otlp import mutated

    one_input, runs = make_check()
    valid = st.sampled_from(seeds())

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300), mutated(valid), mutated(mutated(valid))))
    def run(data: bytes) -> None:
        one_input(data)

    run()
    return runs[0]


def main(argv: list[str]) -> int:
    if "--replay" in argv:
        paths = argv[argv.index("--replay") + 1:]
        print(f"decode_fuzz: {replay(paths)} inputs replayed, the decoders agreed on all")
        return 0
    if "--fallback" in argv:
        i = argv.index("--examples") if "--examples" in argv else -1
        examples = int(argv[i + 1]) if i >= 0 else 1000
        print(f"decode_fuzz: {fuzz_with_hypothesis(examples)} inputs, the decoders agreed on all")
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("decode_fuzz: atheris is not installed (pip install atheris); "
              "run with --fallback for the Hypothesis loop", file=sys.stderr)
        return 2
    fuzz_with_atheris(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
