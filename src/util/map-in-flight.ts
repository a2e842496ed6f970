/**
 * `fn(0)` … `fn(count - 1)` with at most `limit` calls in flight, started in index order: a few
 * lanes, each taking the next index as its call ends. Resolves with the results in index order;
 * rejects with the first failure (the other lanes still run to the end, and their results are
 * dropped). For I/O whose latency, not its bandwidth, would otherwise set the pace.
 */
export async function mapInFlight<T>(count: number, limit: number, fn: (index: number) => Promise<T>): Promise<T[]> {
  const results: T[] = new Array(count)
  let next = 0
  const lane = async (): Promise<void> => {
    while (next < count) {
      const index = next++
      results[index] = await fn(index)
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, count) }, lane))
  return results
}
