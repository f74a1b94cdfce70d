// vitest globalSetup (runs in Node, before the workerd pool starts): the real upstream MCP server of
// test/proxy.test.ts. Its base URL is provided to vitest.config.mts, which hands it to the worker
// as the binding UPSTREAM_TESTUP_URL (the env var that overrides an upstream's URL, contract 3.12).
// The same base serves the legacy HTTP+SSE endpoints (/t/<tag>/<mode>/sse): the tests derive them from it.
import { startUpstream } from "./upstream-server.mjs";

export default async function setup({ provide }) {
  const upstream = await startUpstream(0);
  provide("upstreamBaseUrl", upstream.url);
  return () => upstream.close();
}
