// Stands in for "@modelcontextprotocol/sdk/types.js" (wrangler.jsonc "alias"): mppx imports it only
// for its MCP transport, which this gateway does not use. Loading it is an error.
throw new Error("@modelcontextprotocol/sdk is not installed: mppx's MCP transport is not available in this gateway");
export {};
