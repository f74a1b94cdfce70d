// The [signup] settings of mcpay.toml (src/generated/manifest.ts → SIGNUP), as a plain type: the
// generated constant has literal types (e.g. `x402: null` when the rail is off).
import { SIGNUP } from "../generated/manifest";

export type SignupRail = "x402" | "mpp";

export interface SignupConfig {
  readonly enabled: boolean;
  readonly priceMcents: number;
  readonly balanceMcents: number;
  readonly scopes: readonly string[];
  readonly signupsPerHour: number;
  /** The configured rails, in the order x402, mpp. */
  readonly rails: readonly SignupRail[];
  readonly x402: {
    readonly network: string;
    readonly asset: string;
    readonly assetName: string;
    readonly assetVersion: string;
    readonly assetDecimals: number;
    /** The price in the asset's base units (priceMcents × 10^(assetDecimals − 5)). */
    readonly amount: string;
    readonly payTo: string;
    readonly facilitatorUrl: string;
    /** JSON-RPC endpoint of the network (X402_RPC_URL overrides it); pending settlements are looked up there. */
    readonly rpcUrl: string;
    readonly maxTimeoutSeconds: number;
  } | null;
  readonly mpp: {
    readonly methods: readonly string[];
    readonly realm: string;
    readonly challengeTtlSeconds: number;
  } | null;
}

export const MANIFEST_SIGNUP: SignupConfig = SIGNUP;
