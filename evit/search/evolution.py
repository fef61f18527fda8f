"""The evolutionary search of the spec, independent of supernets, devices and files.

One run searches one budget: a population of feasible subnets (seeds from a memory bank,
then random feasible draws), then per generation keep the `top_k` fittest and add
`mutations` mutants and `crossovers` children of random top-k parents, each checked
against the constraint before it costs an evaluation. The best feasible subnet ever
evaluated wins (not only the last generation's).

Everything that costs time is passed in as a callable:
- `feasible(archs) -> list[bool]`: vectorised, so thousands of candidates are filtered
  with one call to the latency predictor;
- `fitness(arch) -> float`: an accuracy, higher is better (the caller caches it);
- `random_arch(rng) -> Arch`: the proposal distribution for random members.
So the loop itself is tested on synthetic fitness functions in milliseconds.

Choices of ours where the spec is silent:
- A child already evaluated in this search is re-drawn (bounded tries) so that each
  generation spends its evaluations on new subnets; when the space is too small to find
  enough new ones, the generation is simply smaller.
- Ties in fitness break towards the lower cost, then the arch key, so results do not
  depend on dict order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from evit.arch import Arch
from evit.config import SearchParams
from evit.space import SearchSpace

log = logging.getLogger(__name__)

Feasible = Callable[[Sequence[Arch]], list[bool]]
Fitness = Callable[[Arch], float]
Cost = Callable[[Arch], float]


@dataclass(frozen=True)
class EvolutionSettings:
    population: int = 64
    generations: int = 6
    top_k: int = 32
    mutations: int = 16
    crossovers: int = 16
    mutate_prob: float = 0.2
    depth_mutate_prob: float = 0.4
    tries_per_member: int = 50
    """Proposals drawn per wanted member before giving up (tight budgets, tiny spaces)."""
    batch: int = 64
    """Proposals checked per `feasible` call."""

    @classmethod
    def from_params(cls, sp: SearchParams) -> EvolutionSettings:
        return cls(population=sp.population, generations=sp.generations, top_k=sp.top_k,
                   mutations=sp.mutations, crossovers=sp.crossovers, mutate_prob=sp.mutate_prob,
                   depth_mutate_prob=sp.depth_mutate_prob)


@dataclass
class GenerationStats:
    generation: int
    evaluated: int
    best_fitness: float
    mean_top_k: float

    def to_dict(self) -> dict[str, float | int]:
        return {"generation": self.generation, "evaluated": self.evaluated,
                "best_fitness": self.best_fitness, "mean_top_k": self.mean_top_k}


@dataclass
class EvolutionResult:
    best: Arch
    best_fitness: float
    scores: dict[Arch, float]
    """Every feasible arch evaluated in this search, with its fitness."""
    history: list[GenerationStats] = field(default_factory=list)
    seeded: int = 0
    """How many members of the first population came from the seeds (memory bank)."""


def _rank(scores: dict[Arch, float], cost: Cost) -> list[Arch]:
    return sorted(scores, key=lambda a: (-scores[a], cost(a), a.key))


def draw_feasible(
    want: int,
    propose: Callable[[], Arch],
    feasible: Feasible,
    exclude: set[Arch],
    *,
    tries: int,
    batch: int,
) -> list[Arch]:
    """Up to `want` distinct feasible archs not in `exclude`, proposing at most `tries` times."""
    out: list[Arch] = []
    taken = set(exclude)
    proposed = 0
    while len(out) < want and proposed < tries:
        n = min(batch, tries - proposed)
        cands = [propose() for _ in range(n)]
        proposed += n
        fresh = []
        for c in cands:
            if c not in taken:
                taken.add(c)
                fresh.append(c)
        if not fresh:
            continue
        for c, ok in zip(fresh, feasible(fresh)):
            if ok and len(out) < want:
                out.append(c)
    return out


def evolve(
    space: SearchSpace,
    settings: EvolutionSettings,
    *,
    feasible: Feasible,
    fitness: Fitness,
    cost: Cost,
    random_arch: Callable[[random.Random], Arch],
    rng: random.Random,
    seeds: Sequence[Arch] = (),
    on_generation: Callable[[GenerationStats], None] | None = None,
) -> EvolutionResult:
    """Run the search; raises ValueError when not a single feasible subnet can be found."""
    s = settings
    # --- initial population: feasible seeds first (in the given order), then random ---------
    unique_seeds = list(dict.fromkeys(seeds))
    ok = feasible(unique_seeds) if unique_seeds else []
    population = [a for a, good in zip(unique_seeds, ok) if good][: s.population]
    n_seeded = len(population)
    population += draw_feasible(
        s.population - len(population), lambda: random_arch(rng), feasible, set(population),
        tries=s.tries_per_member * s.population, batch=s.batch,
    )
    if not population:
        raise ValueError("no feasible subnet found for this constraint")
    if len(population) < s.population:
        log.warning("only %d feasible subnets found for a population of %d", len(population), s.population)

    scores: dict[Arch, float] = {}

    def evaluate(archs: Sequence[Arch]) -> None:
        for a in archs:
            if a not in scores:
                scores[a] = float(fitness(a))

    evaluate(population)
    history: list[GenerationStats] = []

    def record(gen: int) -> None:
        ranked = _rank(scores, cost)
        top = ranked[: s.top_k]
        st = GenerationStats(gen, len(scores), scores[ranked[0]], sum(scores[a] for a in top) / len(top))
        history.append(st)
        if on_generation:
            on_generation(st)

    record(0)
    for gen in range(1, s.generations + 1):
        ranked = sorted(dict.fromkeys(population), key=lambda a: (-scores[a], cost(a), a.key))
        parents = ranked[: s.top_k]
        seen = set(scores)
        mutants = draw_feasible(
            s.mutations,
            lambda: space.mutate(rng.choice(parents), rng, s.mutate_prob, s.depth_mutate_prob),
            feasible, seen, tries=s.tries_per_member * max(1, s.mutations), batch=s.batch,
        )
        seen.update(mutants)

        def cross() -> Arch:
            a, b = (rng.sample(parents, 2) if len(parents) > 1 else (parents[0], parents[0]))
            return space.crossover(a, b, rng)

        children = draw_feasible(
            s.crossovers, cross, feasible, seen,
            tries=s.tries_per_member * max(1, s.crossovers), batch=s.batch,
        )
        population = parents + mutants + children
        evaluate(mutants + children)
        record(gen)

    best = _rank(scores, cost)[0]
    return EvolutionResult(best=best, best_fitness=scores[best], scores=scores, history=history,
                           seeded=n_seeded)
