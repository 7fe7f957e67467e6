"""The beam-search planner: a hand-built world with known dynamics where lookahead fixes greedy Q;
H = 0 is greedy; K = all legal, H = 1 is brute-force one-step lookahead; the cached planner equals a
from-scratch recomputation (every core); batched equals a loop over environments; call/token counts."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from wam.datasets.errors import WamError
from wam.planning.beam import BeamSearchPlanner, index_state, max_context_frames, repeat_state
from wam.worldmodel.cores import available_cores
from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig

# ----------------------------------------------------------------------------- hand-built world
SHARP = 40.0  # logit of the certain class: softmax gives it 1 - 1e-17


@dataclass
class ToyState:
    s: torch.Tensor  # [B] the environment state the last token stands for
    pos: int


class ToyWorld:
    """A world model with the `WorldActionModel` incremental interface and hand-written tables.

    One token per frame (the state id); `q_logits` are the Q-values themselves ([B, 18]).
    """

    def __init__(self, nxt: torch.Tensor, reward: torch.Tensor, done: torch.Tensor, q: torch.Tensor) -> None:
        self.nxt, self.reward, self.done, self.q = nxt, reward, done, q  # [S, 18] each
        self.cfg = SimpleNamespace(tokens_per_obs=1, max_tokens=10_000)
        self.calls: list[int] = []  # batch size of every call

    def init_state(self, game_ids: torch.Tensor) -> ToyState:
        return ToyState(torch.zeros_like(game_ids), 0)

    def observe(self, tokens: torch.Tensor, state: ToyState) -> tuple[torch.Tensor, ToyState]:
        s = tokens[:, 0]
        return self.q[s], ToyState(s, state.pos + 1)

    def act(self, action: torch.Tensor, state: ToyState):
        self.calls.append(len(action))
        s2 = self.nxt[state.s, action]
        n_states = self.nxt.shape[0]
        rew = SHARP * torch.nn.functional.one_hot(self.reward[state.s, action] + 1, 3).float()
        term = SHARP * torch.nn.functional.one_hot(self.done[state.s, action].long(), 2).float()
        first = SHARP * torch.nn.functional.one_hot(s2, n_states).float()
        return rew, term, first, ToyState(state.s, state.pos + 1)

    def decode_next_obs(self, first_logits: torch.Tensor, state: ToyState):
        self.calls.append(len(first_logits))
        tok = first_logits.argmax(-1)
        return tok[:, None], self.q[tok], ToyState(tok, state.pos + 1)

    def q_values(self, q_logits: torch.Tensor, legal: torch.Tensor) -> torch.Tensor:
        return q_logits.float().masked_fill(~legal, float("-inf"))


def trap_world(terminal_after_a1: bool = False) -> ToyWorld:
    """State 0: action 0 pays +1 now but leads (via 1) to state 3 that pays -1 and is worth -5;
    action 1 pays 0 now and leads (via 2) to state 4 that pays +1 and is worth +5. The Q table is
    myopic: Q(0) prefers action 0, Q(1) = Q(2) hide the difference. Only actions 0, 1 are legal;
    the illegal action 5 has the highest Q everywhere."""
    s, a = 6, 18
    nxt = torch.full((s, a), 5)
    nxt[0, 0], nxt[0, 1], nxt[1], nxt[2], nxt[3], nxt[4] = 1, 2, 3, 4, 5, 5
    reward = torch.zeros(s, a, dtype=torch.long)
    reward[0, 0], reward[3], reward[4] = 1, -1, 1
    done = torch.zeros(s, a, dtype=torch.bool)
    if terminal_after_a1:
        done[2] = True
    q = torch.zeros(s, a)
    q[:, 5] = 100.0
    q[0, :2] = torch.tensor([1.0, 0.0])
    q[1, :2] = q[2, :2] = torch.tensor([0.5, 0.4])
    q[3, :2] = torch.tensor([-5.0, -6.0])
    q[4, :2] = torch.tensor([5.0, 4.0])
    return ToyWorld(nxt, reward, done, q)


def toy_root(world: ToyWorld, start: list[int]):
    legal = torch.zeros(len(start), 18, dtype=torch.bool)
    legal[:, :2] = True
    q, st = world.observe(torch.tensor(start)[:, None], world.init_state(torch.zeros(len(start), dtype=torch.long)))
    return st, q, legal


def test_lookahead_fixes_the_myopic_greedy_choice():
    world = trap_world()
    st, q, legal = toy_root(world, [0])
    g = 0.9
    res = {h: BeamSearchPlanner(world, beam_width=2, horizon=h, gamma=g, backup="leaf").plan(st, q, legal)
           for h in (0, 1, 2)}
    assert res[0].action.item() == 0 and res[0].greedy_action.item() == 0, "greedy follows the myopic Q"
    assert res[1].action.item() == 0, "one step is not enough to see the trap"
    assert res[2].action.item() == 1, "two steps see the trap and choose action 1"
    # candidate order is by raw Q: [0, 1]; values by hand
    assert res[2].candidates.tolist() == [[0, 1]]
    torch.testing.assert_close(res[1].candidate_q, torch.tensor([[1 + g * 0.5, 0 + g * 0.5]]))
    torch.testing.assert_close(res[2].candidate_q, torch.tensor([[1 + g * g * -5.0, g * g * 5.0]]))
    torch.testing.assert_close(res[2].raw_q[0, :2], torch.tensor([1.0, 0.0]))
    assert res[2].plans.tolist() == [[[0, 0], [1, 0]]], "beams continue with the best legal action, never 5"
    # same with the argmax reward mode (the toy's reward heads are certain)
    arg = BeamSearchPlanner(world, 2, 2, g, reward="argmax", backup="leaf").plan(st, q, legal)
    torch.testing.assert_close(arg.candidate_q, res[2].candidate_q)


def test_mean_backup_averages_the_expansions_by_hand():
    world = trap_world()
    st, q, legal = toy_root(world, [0])
    g = 0.9
    res = BeamSearchPlanner(world, 2, 2, g).plan(st, q, legal)  # backup="mean", the default
    # G^(0) = raw Q, G^(1) = r0 + g Q(s1, a1), G^(2) = r0 + g r1 + g^2 Q(s2, a2); the value is their mean
    want = torch.tensor([[(1.0 + (1 + g * 0.5) + (1 + g * g * -5.0)) / 3, (0.0 + g * 0.5 + g * g * 5.0) / 3]])
    torch.testing.assert_close(res.candidate_q, want)
    assert res.action.item() == 1, "the trap two steps ahead still outweighs the myopic +1"
    one = BeamSearchPlanner(world, 2, 1, g).plan(st, q, legal)
    torch.testing.assert_close(one.candidate_q, torch.tensor([[(1.0 + 1 + g * 0.5) / 2, (0.0 + g * 0.5) / 2]]))
    zero = BeamSearchPlanner(world, 2, 0, g).plan(st, q, legal)
    torch.testing.assert_close(zero.candidate_q, torch.tensor([[1.0, 0.0]]))


def action_blind_world() -> ToyWorld:
    """Every action of state 0 leads to state 1 with reward 0 (imagination that ignores the action, as the
    small recipe's model does in 87 % of Boxing states); Q(0) ranks action 1 above action 0."""
    s, a = 3, 18
    nxt = torch.full((s, a), 2)
    nxt[0] = 1
    q = torch.zeros(s, a)
    q[0, :2] = torch.tensor([0.3, 0.5])
    q[1, :2] = q[2, :2] = torch.tensor([1.0, 0.8])
    return ToyWorld(nxt, torch.zeros(s, a, dtype=torch.long), torch.zeros(s, a, dtype=torch.bool), q)


def test_mean_backup_keeps_q_ranking_where_imagination_ignores_the_action():
    world = action_blind_world()
    st, q, legal = toy_root(world, [0])
    leaf = BeamSearchPlanner(world, 2, 2, 0.9, backup="leaf").plan(st, q, legal)
    assert leaf.candidate_q[0, 0] == leaf.candidate_q[0, 1], "both branches imagine the same future"
    assert leaf.action.item() == 1, "a tie goes to the first candidate, the best raw Q (action 1)"
    mean = BeamSearchPlanner(world, 2, 2, 0.9).plan(st, q, legal)
    gap = (mean.candidate_q[0, 0] - mean.candidate_q[0, 1]).item()
    assert mean.action.item() == 1 and gap == pytest.approx((0.5 - 0.3) / 3), "Q's gap survives, divided by H+1"
    # with a prior bonus against the best raw Q, leaf follows the prior, mean still weighs Q's gap
    prior = torch.full((1, 18), -30.0)
    prior[0, :2] = torch.tensor([0.0, -0.5])
    world.acting_values = lambda ql, lg, pl: world.q_values(ql, lg) + 0.1 * (
        pl.float().masked_fill(~lg, float("-inf")).log_softmax(-1).masked_fill(~lg, 0.0))
    assert BeamSearchPlanner(world, 2, 2, 0.9, backup="leaf").plan(st, q, legal, prior).action.item() == 0
    assert BeamSearchPlanner(world, 2, 2, 0.9).plan(st, q, legal, prior).action.item() == 1


def test_terminated_branch_stops_accruing():
    world = trap_world(terminal_after_a1=True)  # the step from state 2 ends the episode
    st, q, legal = toy_root(world, [0])
    res = BeamSearchPlanner(world, 2, 3, 0.9, backup="leaf").plan(st, q, legal)
    # branch of action 1: r=0 at 0, r=0 at 1 (terminal), then nothing: value 0, no +1 of state 4, no bootstrap
    assert res.alive[0, 1].tolist() == [True, True, False, False]
    assert res.candidate_q[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert res.candidate_q[0, 0].item() == pytest.approx(1 - 0.81, abs=1e-6)  # +1, 0, -1, bootstrap Q(5) = 0
    assert res.action.item() == 0, "the terminal branch lost its +1 and its bootstrap"
    free = BeamSearchPlanner(trap_world(), 2, 3, 0.9, backup="leaf").plan(st, q, legal)
    assert free.candidate_q[0, 1].item() == pytest.approx(0.81, abs=1e-6) and free.action.item() == 1


def test_toy_batched_equals_loop_and_one_call_per_token():
    world = trap_world()
    planner = BeamSearchPlanner(world, 2, 2, 0.9)
    st, q, legal = toy_root(world, [0, 1, 2])
    world.calls.clear()
    batched = planner.plan(st, q, legal)
    assert world.calls == [6] * 4, "H=2 steps x (act + 1 token), each one call over B*K = 6 rows"
    assert batched.model_calls == 4 and batched.tokens == 3 * 2 * 2 * 2
    for i in range(3):
        one = planner.plan(index_state(st, torch.tensor([i])), q[i:i + 1], legal[i:i + 1])
        assert one.action.tolist() == batched.action[i:i + 1].tolist()
        torch.testing.assert_close(one.candidate_q, batched.candidate_q[i:i + 1])


def test_state_helpers_repeat_and_index_every_field():
    st = ToyState(torch.tensor([3, 7]), pos=5)
    rep = repeat_state(st, 3)
    assert rep.s.tolist() == [3, 3, 3, 7, 7, 7] and rep.pos == 5
    assert index_state(rep, torch.tensor([5, 0])).s.tolist() == [7, 3]
    assert st.s.tolist() == [3, 7], "the given state is not modified"


# ------------------------------------------------------------------------ the real model, tiny
def tiny_model(build, core: str, tokens_per_obs: int = 4, horizon: int = 4, prior: float = 0.0) -> WorldActionModel:
    opts = {"mamba2": ("headdim=16", "chunk_size=16"), "atlas": ("chunk_size=16",)}.get(core, ())
    cfg = WorldActionModelConfig(vocab_size=16, tokens_per_obs=tokens_per_obs, d_model=32, n_layers=1, n_heads=2,
                                 horizon=horizon, games=("A", "B"), core=core, core_options=opts,
                                 behaviour_prior=prior)
    return build(cfg, double=True)


def context(model: WorldActionModel, b: int, frames: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    k = model.cfg.tokens_per_obs
    obs = torch.randint(0, model.cfg.vocab_size, (b, frames, k), generator=g)
    actions = torch.randint(0, 6, (b, frames - 1), generator=g)
    game_ids = torch.arange(b) % 2
    legal = torch.zeros(b, 18, dtype=torch.bool)
    legal[:, :6] = True
    legal[0, 2] = False  # rows differ
    return obs, actions, game_ids, legal


def scratch_plan(model: WorldActionModel, obs, actions, game_ids, legal, k: int, h: int, gamma: float,
                 backup: str = "mean"):
    """Reference without any cache: every token re-runs the core over the whole sequence so far."""
    cfg = model.cfg
    x0 = model.embed_sequence(obs, actions, game_ids)  # [B, L, D], positions included
    raw = model.q_values(model(obs, actions, game_ids)[0].q_logits[:, -1], legal)
    cand = raw.topk(k, -1).indices  # [B, K]
    rows = torch.arange(len(obs)).repeat_interleave(k)
    x, gid, lg = x0[rows], game_ids[rows], legal[rows]
    action = cand.reshape(-1)
    value = torch.zeros(len(rows), dtype=torch.float64)  # the discounted imagined rewards so far
    alive = torch.ones(len(rows), dtype=torch.bool)
    expansions = [raw.gather(1, cand).reshape(-1).double()]  # G^(0) = raw Q

    def last(x):
        y, _ = model.core(x)
        return model.ln_f(y[:, -1])

    def add(x, vec):
        return torch.cat([x, (vec + model.pos_embedding.weight[x.shape[1]])[:, None]], 1)

    for d in range(h):
        x = add(x, model._embed_actions(action, gid))
        hh = last(x)
        p = model.reward_head(hh).softmax(-1)
        value += gamma ** d * alive * (p[:, 2] - p[:, 0])
        alive = alive & ~(model.termination_head(hh).softmax(-1)[:, 1] > 0.5)
        logits = model.obs_head(hh)
        for _ in range(cfg.tokens_per_obs):
            x = add(x, model._embed_obs(logits.argmax(-1), gid))
            hh = last(x)
            logits = model.obs_head(hh)
        q = model.q_values(model.q_head(hh), lg)
        boot, action = q.max(-1)
        expansions.append(value + gamma ** (d + 1) * alive * boot)
    value = torch.stack(expansions).mean(0) if backup == "mean" else expansions[-1]
    return cand, value.view(len(obs), k)


@pytest.mark.parametrize("core", available_cores())
def test_cached_planning_equals_recomputing_from_scratch(core, build_sharp_model):
    model = tiny_model(build_sharp_model, core)
    obs, actions, game_ids, legal = context(model, b=2, frames=2)
    for backup in ("mean", "leaf"):
        planner = BeamSearchPlanner(model, beam_width=2, horizon=2, gamma=0.9, backup=backup)
        res = planner.plan_context(obs, actions, game_ids, legal)
        with torch.no_grad():
            cand, value = scratch_plan(model, obs, actions, game_ids, legal, 2, 2, 0.9, backup)
        assert res.candidates.tolist() == cand.tolist()
        torch.testing.assert_close(res.candidate_q.double(), value, atol=1e-5, rtol=1e-5)


def test_horizon_zero_is_greedy_argmax(build_sharp_model):
    model = tiny_model(build_sharp_model, "transformer", tokens_per_obs=36)
    obs, actions, game_ids, legal = context(model, b=3, frames=2)
    res = BeamSearchPlanner(model, beam_width=3, horizon=0).plan_context(obs, actions, game_ids, legal)
    q = model.q_values(model(obs, actions, game_ids)[0].q_logits[:, -1], legal)
    assert res.action.tolist() == q.argmax(-1).tolist()
    assert res.model_calls == 0 and res.tokens == 0


@pytest.mark.parametrize("prior", [0.0, 5.0])
def test_all_legal_one_step_equals_brute_force_lookahead(build_sharp_model, prior):
    """Every candidate's planned value by hand: expected reward + gamma * Q at the leaf, where the leaf action is
    the max of Q (no prior) or what acting takes there, argmax Q + tau log pi_b (a prior; here a strong one)."""
    model = tiny_model(build_sharp_model, "mamba", prior=prior)
    obs, actions, game_ids, legal = context(model, b=2, frames=3)
    gamma = 0.97
    res = BeamSearchPlanner(model, beam_width=18, horizon=1, gamma=gamma,
                            backup="leaf").plan_context(obs, actions, game_ids, legal)
    mean = BeamSearchPlanner(model, beam_width=18, horizon=1, gamma=gamma).plan_context(obs, actions, game_ids, legal)
    assert res.candidates.shape[1] == 6, "K is capped at the most legal actions of any row"
    differs = 0
    with torch.no_grad():
        for b in range(2):
            out, st = model(obs[b:b + 1], actions[b:b + 1], game_ids[b:b + 1])
            root_q = model.q_values(out.q_logits[:, -1], legal[b:b + 1])
            root_prior = out.prior_logits[:, -1] if out.prior_logits is not None else None
            bonus = model.acting_values(out.q_logits[:, -1], legal[b:b + 1], root_prior) - root_q  # tau log pi_b
            best_a, best_v = None, -float("inf")
            for a in torch.nonzero(legal[b])[:, 0].tolist():
                rl, tl, first, st1 = model.act(torch.tensor([a]), st)
                _, q1, prior1, _ = model.imagine_next_obs(first, st1)
                p = rl.softmax(-1)[0]
                done = tl.softmax(-1)[0, 1] > 0.5
                q1v = model.q_values(q1, legal[b:b + 1])
                # the leaf action is the one acting would take there (Q + tau log pi_b with a prior, else max Q)
                leaf = model.acting_values(q1, legal[b:b + 1], prior1).argmax(-1)
                differs += int(leaf.item() != q1v.argmax(-1).item())
                v = (p[2] - p[0]) + gamma * (0.0 if done else q1v[0, leaf].item())
                j = res.candidates[b].tolist().index(a)
                assert res.candidate_q[b, j].item() == pytest.approx(float(v), abs=1e-5)
                # backup="mean" (the default): the mean of G^(0) = raw Q and G^(1) = v
                assert mean.candidate_q[b, j].item() == pytest.approx((root_q[0, a].item() + float(v)) / 2, abs=1e-5)
                if v + bonus[0, a].item() > best_v:  # the choice adds the root's prior term
                    best_a, best_v = a, v + bonus[0, a].item()
            assert res.action[b].item() == best_a
        assert res.candidate_q[0].isinf().sum() == 1, "row 0 has 5 legal actions: its 6th candidate is -inf"
    assert (differs > 0) == (prior > 0), "with a strong prior some leaves take another action than max Q"


@pytest.mark.parametrize("core", ["transformer", "mamba2"])
def test_batched_equals_loop_and_counts_calls(core, monkeypatch, build_sharp_model):
    model = tiny_model(build_sharp_model, core)
    obs, actions, game_ids, legal = context(model, b=3, frames=2)
    planner = BeamSearchPlanner(model, beam_width=3, horizon=2, gamma=0.99)
    batch_sizes: list[int] = []
    step = model._step

    def counting_step(x, state):
        batch_sizes.append(x.shape[0])
        return step(x, state)

    monkeypatch.setattr(model, "_step", counting_step)
    batched = planner.plan_context(obs, actions, game_ids, legal)
    assert batch_sizes == [9] * (2 * 5), "one model call per token (action + 4 obs tokens), over all B*K = 9 rows"
    assert batched.model_calls == 10 and batched.tokens == 3 * 3 * 2 * 5
    for i in range(3):
        one = planner.plan_context(obs[i:i + 1], actions[i:i + 1], game_ids[i:i + 1], legal[i:i + 1])
        assert one.action.tolist() == batched.action[i:i + 1].tolist()
        assert one.plans.tolist() == batched.plans[i:i + 1].tolist()
        torch.testing.assert_close(one.candidate_q, batched.candidate_q[i:i + 1], atol=1e-5, rtol=1e-5)


def test_context_that_leaves_no_room_is_a_user_error(build_sharp_model):
    model = tiny_model(build_sharp_model, "transformer", tokens_per_obs=8, horizon=3)
    # Q is trained at frame slots 0..2 (H=3): 2 imagined steps leave one real frame
    assert max_context_frames(model, 2) == 1 and max_context_frames(model, 0) == 3
    with pytest.raises(WamError, match="horizon of 3 does not fit"):
        max_context_frames(model, 3)
    obs, actions, game_ids, legal = context(model, b=1, frames=2)
    with pytest.raises(WamError, match="at most 1 frames of context"):
        BeamSearchPlanner(model, 2, 2).plan_context(obs, actions, game_ids, legal)
    with pytest.raises(WamError, match="beam width"):
        BeamSearchPlanner(model, 0, 2)
