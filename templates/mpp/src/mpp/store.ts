// mppx's atomic store on Durable Objects: shared with the worker gateway (src/lib/payment-store.ts).
export { durableStore, paymentObject } from "../lib/payment-store";
