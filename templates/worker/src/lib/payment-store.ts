// mppx's atomic store on Durable Objects: one PaymentDO per key ("store:<key>"), updated by
// compare-and-set, so concurrent updates of one payment (a Tempo transaction's replay marker, a
// payment channel) are applied one after the other.
import { Store } from "mppx";
import type { PaymentDO } from "./payment-do";

export function paymentObject<T extends PaymentDO>(ns: DurableObjectNamespace<T>, name: string): DurableObjectStub<T> {
  return ns.get(ns.idFromName(name));
}

const MAX_CAS_ATTEMPTS = 32;

export function durableStore<T extends PaymentDO>(namespace: DurableObjectNamespace<T>): Store.AtomicStore {
  // Only the base class's methods are used (the mpp target binds a subclass with more).
  const ns = namespace as unknown as DurableObjectNamespace<PaymentDO>;
  const obj = (key: string) => paymentObject(ns, `store:${key}`);
  return Store.cloudflare({
    async get(key) {
      return (await obj(key).kvGet(key)).value;
    },
    async put(key, value) {
      await obj(key).kvPut(key, value);
    },
    async delete(key) {
      await obj(key).kvDelete(key);
    },
    async update(key, fn) {
      const stub = obj(key);
      for (let i = 0; i < MAX_CAS_ATTEMPTS; i++) {
        const cur = await stub.kvGet(key);
        const change = fn(cur.value);
        if (change.op === "noop") return change.result;
        const next = change.op === "set" ? change.value : null;
        if (await stub.kvCompareAndSet(key, cur.version, next)) return change.result;
      }
      throw new Error(`store update of ${key} kept conflicting`);
    },
  });
}
