"""What `/metrics` exports about the scheduler (Prometheus text format)."""

from __future__ import annotations

from runtime.scheduler import Scheduler


class SchedulerCollector:
    """Prometheus gauges and counters read from the scheduler at scrape time."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.scheduler
        gauges = {"queue_depth": ("Requests waiting", s.queue_depth),
                  "running_sequences": ("Sequences being prefilled or decoded", len(s.running)),
                  "kv_blocks_used": ("KV-cache blocks held by sequences", s.pool.used),
                  "kv_blocks_total": ("KV-cache blocks in the pool", s.pool.num_blocks),
                  "decode_tokens_per_second": ("Tokens per second of recent steps", s.stats.decode_tokens_per_s)}
        if getattr(s, "k", 0):  # a draft model or an EAGLE head
            gauges["speculative_acceptance_rate"] = ("Draft tokens accepted / proposed", s.stats.acceptance_rate)
            gauges["speculative_tokens_per_target_step"] = ("Tokens per target pass with a draft",
                                                             s.stats.tokens_per_target_step)
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"shrinkwrap_{name}", doc, value=value)
        counters = {"prefix_cache_hit_blocks": ("KV blocks reused from the prefix cache", s.pool.prefix_hits),
                    "response_cache_hits": ("Greedy requests answered from the response cache",
                                            s.stats.response_cache_hits),
                    "generated_tokens": ("Tokens generated", s.stats.generated_tokens),
                    "prompt_tokens": ("Prompt tokens admitted", s.stats.prompt_tokens),
                    "finished_requests": ("Requests finished", s.stats.finished_requests),
                    "cancelled_requests": ("Requests cancelled (client gone or stop string)",
                                           s.stats.cancelled_requests)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"shrinkwrap_{name}", doc, value=value)
