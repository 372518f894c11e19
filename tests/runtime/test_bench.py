import json
import subprocess
import sys


def test_load_test_against_a_started_server(tiny_artifact, tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "-m", "runtime.bench", "--artifact", str(tiny_artifact.path),
                           "--concurrency", "3", "--requests", "6", "--prompt-len", "16", "--max-tokens", "5",
                           "--client-processes", "2", "--static-baseline", "--out", str(out), "--server-args", "--loop asyncio --http h11 --gil-switch-ms 2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    served = result["server"]
    assert served["completed"] == 6 and served["statuses"] == {"200": 6}
    assert 0 < served["generated_tokens"] <= 30 and served["ttft_s"]["p50"] <= served["latency_s"]["p99"]
    assert served["client_processes"] == 2 and served["client_cpu_share"] > 0  # two client processes, merged
    assert served["server_cpu_share"]["server"] > 0
    steps = result["server_steps"]  # the server's own account of its steps, read from /metrics
    assert sum(steps["step_tokens"].values()) == served["generated_tokens"]
    assert all(steps["step_host_seconds"][k] <= steps["step_seconds"][k] for k in steps["steps"])
    assert result["hf_serial"]["generated_tokens"] > 0 and result["throughput_ratio"] > 0
    static = result["static_serial"]["decode_tok_s_per_request"]  # the same prompts through the static decoder
    assert static["p50"] > 0 and result["decode_share_of_static"] > 0


def test_bad_arguments_fail_in_one_line(tiny_artifact):
    proc = subprocess.run([sys.executable, "-m", "runtime.bench", "--artifact", str(tiny_artifact.path),
                           "--requests", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
