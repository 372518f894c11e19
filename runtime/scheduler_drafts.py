"""The scheduler's speculative parts (`Scheduler` inherits them; split out for length): every decoding
sequence's proposals before a step (an EAGLE head for all greedy ones in one pass per draft token, else per
sequence; an exit head per greedy sequence; or a draft model's batched passes), the step's target pass (an
exit head's sequences verified from their layer-L states), and the exact rejection rule over each sequence's
rows after."""

from __future__ import annotations

from typing import Any

import torch

from runtime.engine import accept_draft, accept_greedy, adjust_logits, draw, probabilities


class DraftSteps:
    """Reads the scheduler's k, max_context, pool, runner, draft, eagle_head, exit_head, batched_drafting,
    prefix_features, stats and `_caches`."""

    def _propose(self, samples: list[Any]) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """Up to k draft tokens per decoding sample (fewer near max_tokens or the context limit)."""
        room = {id(s): max(0, min(self.k, s.request.params.max_new_tokens - len(s.request.outputs[s.index]) - 1,
                                  self.max_context - len(s.seq.tokens) - 1)) for s in samples}
        proposals: dict[int, tuple[list[int], list[torch.Tensor]]] = {id(s): ([], []) for s in samples}
        active = [s for s in samples if room[id(s)] > 0]
        if self.eagle_head is not None:  # on the features each sequence's last pass left
            together = [s for s in active if self.batched_drafting and s.request.params.temperature <= 0
                        and s.eagle.can_propose()]
            if together:
                from runtime.eagle_rows import propose_greedy

                for sample, tokens in zip(together, propose_greedy([s.eagle for s in together],
                                                                   [room[id(s)] for s in together]), strict=True):
                    proposals[id(sample)] = (tokens, [None] * len(tokens))
            drafted = {id(s) for s in together}
            for sample in active:
                if id(sample) not in drafted:
                    proposals[id(sample)] = sample.eagle.propose(room[id(sample)], sample.request.params,
                                                                 sample.generator)
            active = []
        if self.exit_head is not None:  # greedy sequences only (the exit's proposals are one-hot)
            from runtime.exit_head import draft_with_exit

            for sample in active:
                params = sample.request.params
                if params.temperature <= 0 and not params.adjusts_logits:
                    tokens, sample.exit_states = draft_with_exit(self.runner, self.exit_head, sample.seq,
                                                                 len(sample.seq.tokens) - 1, room[id(sample)])
                    proposals[id(sample)] = (tokens, [None] * len(tokens))
            active = []
        while active:
            logits = self.draft.runner.forward([s.draft_seq for s in active])
            for sample, rows in zip(active, logits, strict=True):
                params = sample.request.params
                if params.temperature <= 0 and not params.adjusts_logits:  # q: one-hot at the argmax (None)
                    token, q = int(rows[-1].argmax()), None
                else:
                    generated = sample.request.outputs[sample.index] + proposals[id(sample)][0]
                    q = probabilities(adjust_logits(rows[-1], params, generated), params)
                    token = int(q.argmax()) if params.temperature <= 0 else draw(q, sample.generator)
                proposals[id(sample)][0].append(token)
                proposals[id(sample)][1].append(q)
                sample.draft_seq.tokens.append(token)
            active = [s for s in active if len(proposals[id(s)][0]) < room[id(s)]]
        for sample in samples:
            sample.seq.tokens.extend(proposals[id(sample)][0])
        return proposals

    def _block_hashes(self, seq: Any, blocks: int) -> list[int]:
        """The chain hashes of the sequence's first `blocks` blocks, as the prefix cache keys them."""
        h, bs, hashes = 0, self.pool.block_size, []
        for i in range(blocks):
            h = self.pool.chain_hash(h, seq.tokens[i * bs:(i + 1) * bs])
            hashes.append(h)
        return hashes

    def _keep_prefix_features(self, sample: Any) -> None:
        """An EAGLE head's features of the sample's full blocks, kept by the blocks' chain hashes: a prompt the
        prefix cache serves later gives them to its head instead of a pass of the target over the cached
        part. At most as many blocks as the pool has, the least recently used dropped first."""
        eagle, bs = sample.eagle, self.pool.block_size
        for i, h in enumerate(self._block_hashes(sample.seq, min(sample.seq.cached, eagle.known) // bs)):
            if h not in self.prefix_features:
                self.prefix_features[h] = eagle.features[i * bs:(i + 1) * bs].clone()
            self.prefix_features.move_to_end(h)
        while len(self.prefix_features) > self.pool.num_blocks:
            self.prefix_features.popitem(last=False)

    def _give_prefix_features(self, sample: Any) -> None:
        """At admission: the kept features of the blocks the prefix cache served, if it has all of them."""
        blocks = sample.seq.cached // self.pool.block_size
        rows = [self.prefix_features.get(h) for h in self._block_hashes(sample.seq, blocks)]
        if rows and all(r is not None for r in rows):
            sample.eagle.extend(torch.cat(rows), 0, sample.seq.cached)
            self.stats.prefix_feature_blocks += blocks

    def _forward(self, batch: list[Any], last_only: list[bool], ends: list[int]) -> list[torch.Tensor]:
        """The target's pass over the step's rows: one batched pass, except the sequences an exit head drafted,
        whose rows run only the layers after the exit, from the states the drafting left."""
        exits = {i for i, s in enumerate(batch) if s.exit_states is not None}
        if not exits:
            return self.runner.forward([s.seq for s in batch], last_only=last_only, ends=ends)
        from runtime.exit_head import verify_from_exit

        rest = [i for i in range(len(batch)) if i not in exits]
        logits: list[Any] = [None] * len(batch)
        if rest:
            passed = self.runner.forward([batch[i].seq for i in rest], last_only=[last_only[i] for i in rest],
                                         ends=[ends[i] for i in rest])
            for i, rows in zip(rest, passed, strict=True):
                logits[i] = rows
        for i in sorted(exits):
            sample = batch[i]
            logits[i] = verify_from_exit(self.runner, self.exit_head, sample.seq, sample.seq.cached,
                                         sample.exit_states)
            sample.seq.cached, sample.exit_states = ends[i], None  # every layer holds these positions now
        return logits

    @staticmethod
    def _greedy_targets(batch: list[Any], logits: list[torch.Tensor], proposals: dict) -> dict[int, list[int]]:
        """The target's argmax at every row of each plainly greedy sample with proposals, in one device call:
        under greedy decoding the rejection rule reduces to them (p and q are one-hot)."""
        picked = [(sample, rows) for sample, rows in zip(batch, logits, strict=True)
                  if proposals.get(id(sample), ((),))[0] and sample.request.params.temperature <= 0
                  and not sample.request.params.adjusts_logits]
        if not picked:
            return {}
        best = torch.cat([rows for _, rows in picked]).argmax(-1).tolist()
        out, at = {}, 0
        for sample, rows in picked:
            out[id(sample)], at = best[at:at + rows.shape[0]], at + rows.shape[0]
        return out

    def _verify(self, sample: Any, rows: torch.Tensor, tokens: list[int], qs: list[torch.Tensor],
                argmaxes: list[int] | None = None) -> list[int]:
        """The exact rejection rule over one sample's proposals (`argmaxes`: the target's per row, greedy: the
        longest agreeing prefix, then the target's token); both caches rolled back to what stands."""
        if argmaxes is not None:
            accepted, final = accept_greedy(tokens, argmaxes)
        else:
            params = sample.request.params
            generated = sample.request.outputs[sample.index]
            ps = [probabilities(adjust_logits(row, params, generated + tokens[:i]), params)
                  for i, row in enumerate(rows)]  # len(tokens) + 1 target distributions
            accepted, final = accept_draft(ps, qs, tokens, sample.generator)
        base = len(sample.seq.tokens) - len(tokens)
        for pool, seq in self._caches(sample):
            pool.truncate(seq, base + accepted)
            seq.tokens.append(final)
        if tokens:
            self.stats.draft_proposed += len(tokens)
            self.stats.draft_accepted += accepted
            self.stats.speculative_steps += 1
            self.stats.speculative_tokens += accepted + 1
        return tokens[:accepted] + [final]
