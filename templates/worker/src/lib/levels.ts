// XP levels and badges, computed from a key's stats (never stored, so rules can evolve).

export function levelFor(xp: number): number {
  return 1 + Math.floor(Math.sqrt(Math.max(0, xp) / 100));
}

export interface BadgeStats {
  readonly calls: number;
  readonly spentMcents: number;
}

const BADGES: ReadonlyArray<readonly [string, (s: BadgeStats) => boolean]> = [
  ["first_call", (s) => s.calls >= 1],
  ["regular", (s) => s.calls >= 100],
  ["power_user", (s) => s.calls >= 1000],
  ["big_spender", (s) => s.spentMcents >= 1_000_000],
];

export function badgesFor(stats: BadgeStats): string[] {
  return BADGES.filter(([, test]) => test(stats)).map(([name]) => name);
}
