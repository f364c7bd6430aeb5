export type Row = readonly [label: string, value: number];
export const formatRows = (rows: Row[], digits = 2): string =>
  rows.map(([label, value]) => `${label.padEnd(8)}${value.toFixed(digits)}`).join("\n");
export function* range(start: number, end: number, step = 1): Generator<number> {
  for (let i = start; i < end; i += step) yield i;
}
