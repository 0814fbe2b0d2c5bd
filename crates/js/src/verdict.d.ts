/** Where the policy keeps bindings, nonce secret and alert throttles. A `Map` works. */
export interface TrunkStore {
  get(key: string): string | undefined;
  set(key: string, value: string): unknown;
  delete(key: string): unknown;
}
/** Why a verdict was given (docs/policy.md); hosts route allowed messages by it. */
export type Cause =
  | "malformed"
  | "bad_credentials"
  | "not_in_access_list"
  | "not_registered_address"
  | "registration_required"
  | "interval_too_brief"
  | "unknown_did"
  | "trunk_unavailable"
  | "auth_required"
  | "stale_nonce"
  | "replayed_nonce"
  | "source_banned"
  | "registered"
  | "unregistered"
  | "registered_contact"
  | "failover"
  | "too_many_hops"
  | "not_configured"
  | "store_unavailable"
  | "in_dialog"
  | "core"
  | "trunk"
  | "pass_through"
  | "response"
  | "held_for_guessing";
/** A verdict (docs/abi.md): the same type the Rust core writes (src/verdict.rs),
 * checked against it by the core's tests (src/wire.rs). */
export interface Verdict {
  action: "allow" | "challenge" | "reject" | "accept" | "route";
  code?: number; reason?: string; cause?: Cause; trunk_group?: string;
  target?: string; next_hop?: string; headers?: [string, string][];
  strip?: string[]; insert?: [string, string][];
  /** On a call routed to a registered PBX: where it goes when the PBX does not
   * answer within `failover_after_ms`, or answers a code `failsOver` accepts. */
  failover?: string; failover_after_ms?: number; failover_on_6xx?: boolean;
}
