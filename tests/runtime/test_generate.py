import contextlib
import io
import subprocess
import sys


def _run(*args):
    """`python -m runtime.generate` in a child process: the real entry point."""
    return subprocess.run([sys.executable, "-m", "runtime.generate", *args], capture_output=True, text=True)


def _call(*args):
    """The same command in this process (its main under run_main, as `python -m` runs it): no interpreter
    start and imports per call."""
    from core.errors import run_main
    from runtime.generate import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(main, list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_generate_cli_plain_and_speculative(tiny_artifact):
    a = str(tiny_artifact.path)
    plain = _run("--artifact", a, "--prompt", "The fire near the town", "--max-tokens", "6")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "decode" in plain.stdout.splitlines()[-1] and "6 tokens" in plain.stdout
    spec = _call("--artifact", a, "--draft", a, "--k", "3", "--prompt", "The fire near the town", "--max-tokens", "6",
                "--chat")
    assert spec.returncode == 0, spec.stderr[-2000:]
    assert "acceptance 1.00" in spec.stdout.splitlines()[-1]
    static = _call("--artifact", a, "--prompt", "The fire near the town", "--max-tokens", "6", "--static")
    assert static.returncode == 0, static.stderr[-2000:]
    assert static.stdout.splitlines()[0] == plain.stdout.splitlines()[0]  # same greedy text
    assert "static decoder" in static.stdout.splitlines()[-1]
    static_spec = _call("--artifact", a, "--draft", a, "--k", "2", "--prompt", "The fire near the town", "--max-tokens",
                       "6", "--static")
    assert static_spec.returncode == 0, static_spec.stderr[-2000:]
    assert static_spec.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    assert "acceptance 1.00" in static_spec.stdout.splitlines()[-1]
    lookup = _call("--artifact", a, "--prompt-lookup", "3", "--k", "4", "--prompt", "The fire near the town",
                  "--max-tokens", "6")
    assert lookup.returncode == 0, lookup.stderr[-2000:]
    assert lookup.stdout.splitlines()[0] == plain.stdout.splitlines()[0] and "acceptance" in lookup.stdout
    static_lookup = _call("--artifact", a, "--prompt-lookup", "3", "--k", "4", "--prompt", "The fire near the town",
                         "--max-tokens", "6", "--static")
    assert static_lookup.returncode == 0, static_lookup.stderr[-2000:]
    assert static_lookup.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    assert "acceptance" in static_lookup.stdout and "static decoder" in static_lookup.stdout
    hybrid = _call("--artifact", a, "--draft", a, "--prompt-lookup", "3", "--lookup-k", "2", "--k", "1", "--prompt",
                  "The fire near the town", "--max-tokens", "6")  # lookup first, the draft where nothing matches
    assert hybrid.returncode == 0, hybrid.stderr[-2000:]
    assert hybrid.stdout.splitlines()[0] == plain.stdout.splitlines()[0] and "acceptance" in hybrid.stdout
    sampled = _call("--artifact", a, "--prompt", "x", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1")
    again = _call("--artifact", a, "--prompt", "x", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1")
    assert sampled.stdout.splitlines()[0] == again.stdout.splitlines()[0]


def test_generate_cli_bad_input(tiny_artifact, tmp_path):
    proc = _run("--artifact", str(tmp_path), "--prompt", "x")
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    proc = _call("--artifact", str(tiny_artifact.path), "--prompt", "x", "--top-p", "0")
    assert proc.returncode == 2 and "top_p" in proc.stderr
    proc = _call("--artifact", str(tiny_artifact.path), "--prompt", "x", "--static", "--temperature", "0.5")
    assert proc.returncode == 2 and "static" in proc.stderr
    proc = _call("--artifact", str(tiny_artifact.path), "--prompt", "x", "--draft", str(tiny_artifact.path),
                "--prompt-lookup", "3", "--static")
    assert proc.returncode == 2 and "prompt_lookup" in proc.stderr
    proc = _call("--artifact", str(tiny_artifact.path), "--prompt", "x", "--prompt-lookup", "3", "--lookup-k", "2")
    assert proc.returncode == 2 and "lookup_k" in proc.stderr
    proc = _call("--artifact", str(tiny_artifact.path), "--prompt", "x", "--draft-confidence", "0.5")
    assert proc.returncode == 2 and "draft_confidence" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _call("--artifact", str(tiny_artifact.path), "--prompt", "x", "--tree-width", "2")
    assert proc.returncode == 2 and "tree_width" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _call("--artifact", str(tiny_artifact.path), "--prompt", "x", "--draft", str(tiny_artifact.path),
                 "--tree-width", "2")
    assert proc.returncode == 2 and "not an EAGLE head" in proc.stderr
