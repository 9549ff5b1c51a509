/** Small text helpers shared by the status bar item and the panel. */
import { IOverview } from './api';

/** "1 GPU", "3 workers": a count with its noun, singular or plural. */
export function plural(count: number, noun: string): string {
  return `${count} ${noun}${count === 1 ? '' : 's'}`;
}

/** "3 workers · 1 GPU": the cluster in a few words. */
export function summary(overview: IOverview): string {
  const { workers, gpus } = overview.totals;
  return `${plural(workers ?? 0, 'worker')} · ${plural(gpus ?? 0, 'GPU')}`;
}

/** Bytes as people read them: "0 B", "1.5 MB", "2.0 GB". */
export function bytes(value: number | undefined): string {
  let size = Number(value ?? 0);
  const units = ['B', 'kB', 'MB', 'GB', 'TB', 'PB'];
  let unit = 0;
  while (size >= 1000 && unit < units.length - 1) {
    size /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${size} B` : `${size.toFixed(1)} ${units[unit]}`;
}

/** A resources mapping as "GPU=1, CPU=2" (or the text it already is). */
export function resources(value: unknown): string {
  if (!value) {
    return '';
  }
  if (typeof value === 'string') {
    return value;
  }
  return Object.entries(value as Record<string, unknown>)
    .map(([key, amount]) => `${key}=${amount}`)
    .join(', ');
}
