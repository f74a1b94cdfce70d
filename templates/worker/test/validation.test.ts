import { createExecutionContext } from "cloudflare:test";
import { exports } from "cloudflare:workers";
import { createApp } from "../src/app";
import { HANDLERS } from "../src/generated/handlers";
import { describe, expect, it } from "vitest";
import { GATEWAY, INPUT_SHAPE, type FieldType } from "../src/generated/manifest";
import { readBoundedText } from "../src/lib/body";
import { HttpError } from "../src/lib/http";
import { MAX_JSON_DEPTH, checkShape } from "../src/lib/shape";
import { BASE, EP, SAMPLE, balanceFor, callPaid, errorOf, getMe, seedKey, testEnv } from "./helpers";

const SHAPE = INPUT_SHAPE[EP];
const sample = SAMPLE as Record<string, unknown>;

function wrongValueFor(t: FieldType): unknown {
  return t === "string" ? 12345 : "not-the-right-type";
}

function deep(depth: number): unknown {
  let v: unknown = 1;
  for (let i = 0; i < depth; i++) v = [v];
  return v;
}

async function expectNoCharge(res: Response, status: number, code: string, key: string, balance: number) {
  expect(res.status).toBe(status);
  const body = await errorOf(res);
  expect(body.error.code).toBe(code);
  expect(body.note).toBe("no charge applied");
  expect(res.headers.get("X-Charged-Mcents")).toBeNull();
  const me = await getMe(key);
  expect(me.balance_mcents).toBe(balance);
  expect(me.calls).toBe(0);
}

describe("validate before charge", () => {
  it("the sample input passes the shape check", () => {
    expect(checkShape(SAMPLE, SHAPE)).toBeNull();
  });

  it("invalid JSON → 400 invalid_json, no charge", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    for (const raw of ["{", "", "nope", "{'a':1}", "[1,]"]) {
      await expectNoCharge(await callPaid(EP, key, raw), 400, "invalid_json", key, balance);
    }
  });

  it("non-object bodies → 400 invalid_input, no charge", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    for (const raw of ["[]", "null", "42", '"str"', "true"]) {
      await expectNoCharge(await callPaid(EP, key, raw), 400, "invalid_input", key, balance);
    }
  });

  it("unknown field → 400 invalid_input, no charge", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    await expectNoCharge(await callPaid(EP, key, { ...sample, __unknown_field__: 1 }), 400, "invalid_input", key, balance);
    // Prototype property names are not fields either.
    await expectNoCharge(await callPaid(EP, key, `{"constructor": 1}`), 400, "invalid_input", key, balance);
    await expectNoCharge(await callPaid(EP, key, `{"__proto__": {"x": 1}}`), 400, "invalid_input", key, balance);
  });

  it("missing required field / wrong type → 400 invalid_input, no charge", async () => {
    const required = Object.entries(SHAPE).filter(([, s]) => s.required);
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    for (const [field, spec] of Object.entries(SHAPE)) {
      if (!Object.hasOwn(sample, field)) continue;
      await expectNoCharge(await callPaid(EP, key, { ...sample, [field]: wrongValueFor(spec.type) }), 400, "invalid_input", key, balance);
      await expectNoCharge(await callPaid(EP, key, { ...sample, [field]: null }), 400, "invalid_input", key, balance);
    }
    for (const [field] of required) {
      const copy = { ...sample };
      delete copy[field];
      await expectNoCharge(await callPaid(EP, key, copy), 400, "invalid_input", key, balance);
    }
  });

  it("field types are checked strictly", () => {
    const shape = {
      s: { type: "string", required: true },
      n: { type: "number", required: false },
      i: { type: "integer", required: false },
      b: { type: "boolean", required: false },
      o: { type: "object", required: false },
      a: { type: "array", required: false },
    } as const;
    expect(checkShape({ s: "x", n: 1.5, i: 2, b: false, o: {}, a: [] }, shape)).toBeNull();
    expect(checkShape({ s: "x" }, shape)).toBeNull();
    expect(checkShape({}, shape)).not.toBeNull();
    expect(checkShape({ s: 1 }, shape)).not.toBeNull();
    expect(checkShape({ s: "x", n: "1" }, shape)).not.toBeNull();
    expect(checkShape({ s: "x", i: 1.5 }, shape)).not.toBeNull();
    expect(checkShape({ s: "x", b: 0 }, shape)).not.toBeNull();
    expect(checkShape({ s: "x", o: [] }, shape)).not.toBeNull();
    expect(checkShape({ s: "x", o: null }, shape)).not.toBeNull();
    expect(checkShape({ s: "x", a: {} }, shape)).not.toBeNull();
  });

  it(`nesting deeper than ${MAX_JSON_DEPTH} → 400 invalid_input, no charge`, async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    const res = await callPaid(EP, key, { ...sample, __deep__: deep(MAX_JSON_DEPTH + 5) });
    expect((await res.clone().json() as { error: { message: string } }).error.message).toMatch(/nesting/);
    await expectNoCharge(res, 400, "invalid_input", key, balance);
    // Very deep (as deep as the body limit allows) is rejected without crashing.
    const levels = Math.min(5000, Math.floor((GATEWAY.maxBodyBytes - 64) / 2));
    const raw = "[".repeat(levels) + "]".repeat(levels);
    const res2 = await callPaid(EP, key, `{"__deep__": ${raw}}`);
    expect(res2.status).toBe(400);
    expect(checkShape({ a: deep(MAX_JSON_DEPTH - 1) }, { a: { type: "array", required: true } })).toBeNull();
  });

  it("wrong or missing content type → 415, no charge", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    for (const ct of ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx"]) {
      await expectNoCharge(await callPaid(EP, key, SAMPLE, { "Content-Type": ct }), 415, "unsupported_media_type", key, balance);
    }
    const noCt = await exports.default.fetch(
      new Request(`${BASE}/v1/${EP}`, { method: "POST", headers: { Authorization: `Bearer ${key}` }, body: new TextEncoder().encode(JSON.stringify(SAMPLE)) }),
    );
    await expectNoCharge(noCt, 415, "unsupported_media_type", key, balance);
    // Parameters and case are fine.
    expect((await callPaid(EP, key, SAMPLE, { "Content-Type": "Application/JSON; charset=utf-8" })).status).toBe(200);
  });
});

describe("body size bounds", () => {
  const max = GATEWAY.maxBodyBytes;

  it("Content-Length over the limit → 413 before reading, no charge", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    const big = JSON.stringify({ ...sample, pad: "x".repeat(max) });
    const res = await callPaid(EP, key, big);
    await expectNoCharge(res, 413, "body_too_large", key, balance);
  });

  it("a streamed body without Content-Length is bounded too → 413, no charge", async () => {
    const balance = balanceFor(3);
    const { key } = await seedKey({ balance });
    const chunk = new TextEncoder().encode(" ".repeat(1024));
    let sent = 0;
    const stream = new ReadableStream<Uint8Array>({
      pull(controller) {
        // An endless body: the gateway must stop reading on its own.
        if (sent === 0) controller.enqueue(new TextEncoder().encode("{\"pad\":\""));
        controller.enqueue(chunk);
        sent += chunk.byteLength;
        if (sent > max * 64) controller.close();
      },
    });
    const req = new Request(`${BASE}/v1/${EP}`, {
      method: "POST",
      headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
      body: stream,
    });
    expect(req.headers.get("Content-Length")).toBeNull();
    // Called in-process so the test observes exactly how much of the stream was pulled.
    const res = await createApp(HANDLERS).fetch(req, testEnv, createExecutionContext());
    await expectNoCharge(res, 413, "body_too_large", key, balance);
    expect(sent).toBeLessThan(max * 64);
  });

  it("a streamed body within the limit is accepted", async () => {
    const { key } = await seedKey({ balance: balanceFor(3) });
    const bytes = new TextEncoder().encode(JSON.stringify(SAMPLE));
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        for (let i = 0; i < bytes.length; i += 3) controller.enqueue(bytes.slice(i, i + 3));
        controller.close();
      },
    });
    const res = await exports.default.fetch(
      new Request(`${BASE}/v1/${EP}`, {
        method: "POST",
        headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
        body: stream,
      }),
    );
    expect(res.status).toBe(200);
  });

  it("readBoundedText counts streamed bytes", async () => {
    const enc = new TextEncoder();
    const mk = (n: number) =>
      new Request(BASE, {
        method: "POST",
        body: new ReadableStream<Uint8Array>({
          start(c) {
            for (let i = 0; i < n; i++) c.enqueue(enc.encode("a"));
            c.close();
          },
        }),
      });
    expect(await readBoundedText(mk(10), 10)).toBe("a".repeat(10));
    await expect(readBoundedText(mk(11), 10)).rejects.toBeInstanceOf(HttpError);
  });
});
