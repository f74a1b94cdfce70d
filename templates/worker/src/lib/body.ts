// Bounded request body reading: the Content-Length header is checked before reading, and the
// stream itself is counted while reading, so chunked bodies without Content-Length are bounded too.
// A body that stalls is bounded by the Workers runtime, not here: the platform ends a request whose
// client stops sending (contract 3.8, time limits); nothing is held before the body was read.
import { HttpError } from "./http";

/** Returns true if the request's Content-Type is application/json (parameters such as charset allowed). */
export function isJsonContentType(header: string | null): boolean {
  if (header === null) return false;
  const mediaType = header.split(";", 1)[0]!.trim().toLowerCase();
  return mediaType === "application/json";
}

function tooLarge(maxBytes: number): HttpError {
  return new HttpError(413, "body_too_large", {
    message: `Request body exceeds ${maxBytes} bytes.`,
    noCharge: true,
    extra: { max_body_bytes: maxBytes },
  });
}

/**
 * Reads a stream whole while it is at most `limit` bytes; null (and the stream cancelled) as soon
 * as it is longer. Request bodies and upstream answers (lib/proxy.ts) are bounded with it.
 */
export async function readStreamUpTo(body: ReadableStream<Uint8Array> | null, limit: number): Promise<Uint8Array | null> {
  if (body === null) return new Uint8Array(0);
  const reader = body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.byteLength;
    if (total > limit) {
      await reader.cancel().catch(() => {});
      return null;
    }
    chunks.push(value);
  }
  const all = new Uint8Array(total);
  let off = 0;
  for (const c of chunks) {
    all.set(c, off);
    off += c.byteLength;
  }
  return all;
}

/** Reads at most `maxBytes` bytes of the body as UTF-8 text, or throws HttpError 413 / 400. */
export async function readBoundedText(req: Request, maxBytes: number): Promise<string> {
  const declared = req.headers.get("Content-Length");
  if (declared !== null) {
    // Only decimal digits: "-5", "12abc", "1e3", "0x10" and "" are refused (never a runtime 500).
    const n = /^[0-9]{1,15}$/.test(declared.trim()) ? Number(declared.trim()) : NaN;
    if (!Number.isFinite(n) || n < 0) {
      throw new HttpError(400, "invalid_json", { message: "Invalid Content-Length.", noCharge: true });
    }
    if (n > maxBytes) throw tooLarge(maxBytes);
  }
  const buf = await readStreamUpTo(req.body, maxBytes);
  if (buf === null) throw tooLarge(maxBytes);
  try {
    return new TextDecoder("utf-8", { fatal: true, ignoreBOM: false }).decode(buf);
  } catch {
    throw new HttpError(400, "invalid_json", { message: "Request body is not valid UTF-8.", noCharge: true });
  }
}

/** Reads, bounds and parses a JSON request body (415 / 413 / 400 with "no charge applied"). */
export async function readJsonBody(req: Request, maxBytes: number): Promise<unknown> {
  return (await readJsonBodyText(req, maxBytes)).value;
}

/** Like readJsonBody, also returning the body's text (for the Idempotency-Key body hash). */
export async function readJsonBodyText(req: Request, maxBytes: number): Promise<{ value: unknown; text: string }> {
  if (!isJsonContentType(req.headers.get("Content-Type"))) {
    throw new HttpError(415, "unsupported_media_type", { noCharge: true });
  }
  const text = await readBoundedText(req, maxBytes);
  try {
    return { value: JSON.parse(text) as unknown, text };
  } catch {
    throw new HttpError(400, "invalid_json", { noCharge: true });
  }
}
