//! What the x402 rail asks of the chain itself, the source of truth for a settlement whose outcome
//! the facilitator did not tell us (docs/contract.md, 3.9):
//!
//! - the local check of a presented payment: the EIP-712 `TransferWithAuthorization` (EIP-3009)
//!   signature must recover to `authorization.from` (alloy's `sol!` types and k256 recovery; no
//!   I/O, so a forged credential is refused before any record is read);
//! - a small JSON-RPC client (alloy's JSON-RPC 2.0 request/response types over the gateway's
//!   reqwest client): `eth_blockNumber`, `eth_getLogs` for the token's
//!   `AuthorizationUsed(authorizer, nonce)` event, and `eth_call` of `authorizationState(address,
//!   bytes32)`.

use std::borrow::Cow;
use std::time::Duration;

use alloy_json_rpc::{Id, Request, Response, ResponsePayload};
use alloy_primitives::{Address, B256, Signature, U256};
use alloy_sol_types::{Eip712Domain, SolCall, SolEvent, SolStruct, sol};
use serde_json::{Value, json};

use crate::config::redact_rpc_url;

sol! {
    /// EIP-3009: what the payer signs (EIP-712, domain of the token contract).
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }

    /// Emitted by the token when an authorization moved the money (EIP-3009).
    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);

    /// True once an authorization was used or cancelled (EIP-3009).
    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
}

/// How far before the recorded block the logs are searched (a reorg, or a node behind another).
const LOG_LOOKBACK_BLOCKS: u64 = 5;

/// An EIP-3009 authorization, parsed from the x402 `exact` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub from: Address,
    pub to: Address,
    pub value: U256,
    pub valid_after: U256,
    pub valid_before: U256,
    pub nonce: B256,
}

fn address(v: &Value, k: &str) -> Result<Address, String> {
    let s = v.get(k).and_then(Value::as_str).unwrap_or("");
    if s.len() != 42 || !s.starts_with("0x") {
        return Err(format!("authorization.{k} is not a 0x address."));
    }
    s.parse::<Address>().map_err(|_| format!("authorization.{k} is not a 0x address."))
}

fn uint(v: &Value, k: &str) -> Result<U256, String> {
    let s = v.get(k).and_then(Value::as_str).unwrap_or("");
    if s.is_empty() || s.len() > 78 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("authorization.{k} is not a decimal integer string."));
    }
    U256::from_str_radix(s, 10).map_err(|_| format!("authorization.{k} is out of range."))
}

fn bytes32(v: &Value, k: &str) -> Result<B256, String> {
    let s = v.get(k).and_then(Value::as_str).unwrap_or("");
    if s.len() != 66 || !s.starts_with("0x") {
        return Err(format!("authorization.{k} is not 32 bytes of hex."));
    }
    s.parse::<B256>().map_err(|_| format!("authorization.{k} is not 32 bytes of hex."))
}

impl Authorization {
    /// `payload.authorization` of an x402 `exact` EVM payment.
    pub fn parse(auth: &Value) -> Result<Authorization, String> {
        Ok(Authorization {
            from: address(auth, "from")?,
            to: address(auth, "to")?,
            value: uint(auth, "value")?,
            valid_after: uint(auth, "validAfter")?,
            valid_before: uint(auth, "validBefore")?,
            nonce: bytes32(auth, "nonce")?,
        })
    }

    /// `validBefore` in seconds, saturated to i64 (a far-future bound stays far in the future).
    pub fn valid_before_secs(&self) -> i64 {
        i64::try_from(self.valid_before).unwrap_or(i64::MAX)
    }

    /// The EIP-712 hash the payer signed, for the token contract `domain`.
    pub fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        TransferWithAuthorization {
            from: self.from,
            to: self.to,
            value: self.value,
            validAfter: self.valid_after,
            validBefore: self.valid_before,
            nonce: self.nonce,
        }
        .eip712_signing_hash(domain)
    }

    /// The address whose key made `signature` (65 bytes r‖s‖v, 0x hex) over this authorization.
    pub fn signer(&self, domain: &Eip712Domain, signature: &str) -> Result<Address, String> {
        let hex_sig = signature.strip_prefix("0x").ok_or("The payment's signature is not 0x hex.")?;
        let raw = hex::decode(hex_sig).map_err(|_| "The payment's signature is not 0x hex.".to_string())?;
        if raw.len() != 65 {
            return Err("The payment's signature is not a 65-byte ECDSA signature (smart-contract wallets, EIP-1271, are not accepted).".into());
        }
        let sig = Signature::from_raw(&raw).map_err(|e| format!("The payment's signature is malformed: {e}."))?;
        sig.recover_address_from_prehash(&self.signing_hash(domain))
            .map_err(|_| "The payment's signature does not recover to an address.".to_string())
    }
}

/// The EIP-712 domain of an EIP-3009 token: `{name, version, chainId, verifyingContract}`.
pub fn token_domain(name: &str, version: &str, chain_id: u64, asset: Address) -> Eip712Domain {
    Eip712Domain::new(
        Some(Cow::Owned(name.to_string())),
        Some(Cow::Owned(version.to_string())),
        Some(U256::from(chain_id)),
        Some(asset),
        None,
    )
}

/// The chain id of a CAIP-2 EVM network ("eip155:<id>").
pub fn eip155_chain_id(network: &str) -> Option<u64> {
    network.strip_prefix("eip155:")?.parse().ok()
}

fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn quantity(v: &Value) -> Result<u64, String> {
    let s = v.as_str().ok_or("not a hex quantity")?;
    let digits = s.strip_prefix("0x").ok_or("not a hex quantity")?;
    u64::from_str_radix(digits, 16).map_err(|_| "not a hex quantity".to_string())
}

/// The `eth_getLogs` filter for the `AuthorizationUsed(from, nonce)` event of `asset`.
pub fn authorization_used_filter(asset: Address, from: Address, nonce: B256, from_block: u64) -> Value {
    json!({
        "address": hex0x(asset.as_slice()),
        "topics": [
            hex0x(AuthorizationUsed::SIGNATURE_HASH.as_slice()),
            hex0x(from.into_word().as_slice()),
            hex0x(nonce.as_slice()),
        ],
        "fromBlock": format!("0x{:x}", from_block.saturating_sub(LOG_LOOKBACK_BLOCKS)),
        "toBlock": "latest",
    })
}

/// The `eth_call` data of `authorizationState(from, nonce)`.
pub fn authorization_state_data(from: Address, nonce: B256) -> String {
    hex0x(&authorizationStateCall { authorizer: from, nonce }.abi_encode())
}

/// An EVM JSON-RPC endpoint (X402_RPC_URL).
#[derive(Clone)]
pub struct Chain {
    client: reqwest::Client,
    url: String,
    timeout: Duration,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain").field("url", &redact_rpc_url(&self.url)).finish()
    }
}

impl Chain {
    pub fn new(client: reqwest::Client, url: &str, timeout: Duration) -> Chain {
        Chain { client, url: url.to_string(), timeout }
    }

    /// One JSON-RPC 2.0 call. Unreachable, a non-2xx status, a malformed answer or a JSON-RPC
    /// error are all errors (the caller keeps the payment pending).
    async fn call(&self, method: &'static str, params: Value) -> Result<Value, String> {
        let request = Request::new(method, Id::Number(1), params);
        let res = self.client.post(&self.url).json(&request).timeout(self.timeout).send().await.map_err(|e| {
            tracing::warn!(error = %e, url = %redact_rpc_url(&self.url), method, "x402 chain RPC unreachable");
            format!("the chain's JSON-RPC endpoint is unreachable ({method})")
        })?;
        let status = res.status();
        if !status.is_success() {
            tracing::warn!(status = status.as_u16(), url = %redact_rpc_url(&self.url), method, "x402 chain RPC answered an error status");
            return Err(format!("the chain's JSON-RPC endpoint answered HTTP {} to {method}", status.as_u16()));
        }
        let answer: Response<Value, Value> =
            res.json().await.map_err(|_| format!("the chain's JSON-RPC endpoint gave a malformed answer to {method}"))?;
        match answer.payload {
            ResponsePayload::Success(v) => Ok(v),
            ResponsePayload::Failure(e) => {
                tracing::warn!(code = e.code, message = %e.message, method, "x402 chain RPC error");
                Err(format!("the chain's JSON-RPC endpoint refused {method}: {}", e.message))
            }
        }
    }

    /// `eth_blockNumber`.
    pub async fn block_number(&self) -> Result<u64, String> {
        let v = self.call("eth_blockNumber", json!([])).await?;
        quantity(&v).map_err(|e| format!("eth_blockNumber: {e}"))
    }

    /// The transaction in which `asset` emitted `AuthorizationUsed(from, nonce)` (searching from
    /// `from_block` − 5), if any: the transfer happened.
    pub async fn transfer_done(&self, asset: Address, from: Address, nonce: B256, from_block: u64) -> Result<Option<String>, String> {
        let v = self.call("eth_getLogs", json!([authorization_used_filter(asset, from, nonce, from_block)])).await?;
        let logs = v.as_array().ok_or("eth_getLogs: the answer is not a list")?;
        for log in logs {
            if log.get("removed").and_then(Value::as_bool) == Some(true) {
                continue;
            }
            let tx = log.get("transactionHash").and_then(Value::as_str).unwrap_or("");
            if tx.len() == 66 && tx.starts_with("0x") && tx[2..].bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(Some(tx.to_ascii_lowercase()));
            }
            return Err("eth_getLogs: a log without a transaction hash".into());
        }
        Ok(None)
    }

    /// The chain's own clock, in seconds: at least the timestamp its next block will carry — the
    /// larger of the `pending` block's timestamp (nodes that build one stamp it with the next
    /// block's time) and the `latest` block's. An EIP-3009 transfer succeeds only in a block stamped
    /// before `validBefore`, and block timestamps never go back: once this is at or past
    /// `validBefore`, that authorization can never be mined. The server's clock decides nothing (it
    /// may run ahead of the chain, and a block stamped just before `validBefore` may not have
    /// reached this RPC yet). Read it before looking for the transfer.
    pub async fn chain_time(&self) -> Result<u64, String> {
        let latest = self.block_timestamp("latest").await?;
        // Not every node serves a pending block: the latest one then decides alone.
        let pending = self.block_timestamp("pending").await.unwrap_or(0);
        Ok(latest.max(pending))
    }

    async fn block_timestamp(&self, tag: &'static str) -> Result<u64, String> {
        let v = self.call("eth_getBlockByNumber", json!([tag, false])).await?;
        let ts = v.get("timestamp").ok_or_else(|| format!("eth_getBlockByNumber({tag}): no block"))?;
        quantity(ts).map_err(|e| format!("eth_getBlockByNumber({tag}): timestamp {e}"))
    }

    /// `authorizationState(from, nonce)` of `asset` (eth_call on the latest block): true once the
    /// authorization was used or cancelled.
    pub async fn authorization_state(&self, asset: Address, from: Address, nonce: B256) -> Result<bool, String> {
        let v = self
            .call("eth_call", json!([{ "to": hex0x(asset.as_slice()), "data": authorization_state_data(from, nonce) }, "latest"]))
            .await?;
        let data = v.as_str().and_then(|s| s.strip_prefix("0x")).and_then(|s| hex::decode(s).ok()).ok_or("eth_call: not hex data")?;
        authorizationStateCall::abi_decode_returns(&data).map_err(|e| format!("authorizationState: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_primitives::keccak256;

    #[test]
    fn event_topic_and_selector() {
        assert_eq!(AuthorizationUsed::SIGNATURE_HASH, keccak256("AuthorizationUsed(address,bytes32)"));
        assert_eq!(
            hex0x(AuthorizationUsed::SIGNATURE_HASH.as_slice()),
            "0x98de503528ee59b575ef0c0a2576a82497bfc029a5685b209e9ec333479b10a5"
        );
        assert_eq!(authorizationStateCall::SELECTOR, [0xe9, 0x4a, 0x01, 0x02]);
        let from: Address = "0x1111111111111111111111111111111111111111".parse().unwrap();
        let nonce = B256::repeat_byte(0xab);
        let data = authorization_state_data(from, nonce);
        assert_eq!(data.len(), 2 + 8 + 64 + 64);
        assert!(data.starts_with("0xe94a0102000000000000000000000000111111111111111111111111111111111111111"));
        assert!(data.ends_with(&"ab".repeat(32)));
    }

    #[test]
    fn log_filter() {
        let asset: Address = "0x036CbD53842c5426634e7929541eC2318f3dCF7e".parse().unwrap();
        let from: Address = "0x1111111111111111111111111111111111111111".parse().unwrap();
        let f = authorization_used_filter(asset, from, B256::repeat_byte(1), 3);
        assert_eq!(f["address"], "0x036cbd53842c5426634e7929541ec2318f3dcf7e");
        assert_eq!(f["topics"][1], format!("0x{}{}", "0".repeat(24), "1".repeat(40)));
        assert_eq!(f["fromBlock"], "0x0", "never below block 0");
        assert_eq!(authorization_used_filter(asset, from, B256::ZERO, 100)["fromBlock"], "0x5f");
        assert_eq!(f["toBlock"], "latest");
    }

    #[test]
    fn authorization_parsing() {
        let ok = json!({"from": format!("0x{}", "1".repeat(40)), "to": format!("0x{}", "2".repeat(40)), "value": "5000",
                        "validAfter": "0", "validBefore": "99999999999", "nonce": format!("0x{}", "a".repeat(64))});
        let a = Authorization::parse(&ok).unwrap();
        assert_eq!(a.value, U256::from(5000));
        assert_eq!(a.valid_before_secs(), 99_999_999_999);
        for (k, bad) in [("value", "0x10"), ("value", "-1"), ("validBefore", ""), ("from", "0x12"), ("nonce", "0x12")] {
            let mut v = ok.clone();
            v[k] = json!(bad);
            assert!(Authorization::parse(&v).is_err(), "{k}={bad}");
        }
    }

    /// A vector made with viem (`hashTypedData`, `signTypedData` of account
    /// 0x4c0883a6…3f362318), independent of this code.
    #[test]
    fn eip712_signature_matches_viem() {
        let auth = Authorization::parse(&json!({
            "from": "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23", "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
            "value": "5000000", "validAfter": "0", "validBefore": "99999999999", "nonce": format!("0x{}", "ab".repeat(32)),
        }))
        .unwrap();
        let asset: Address = "0x036CbD53842c5426634e7929541eC2318f3dCF7e".parse().unwrap();
        let domain = token_domain("USDC", "2", 84532, asset);
        assert_eq!(
            hex0x(auth.signing_hash(&domain).as_slice()),
            "0xf9f1c2081be9a99840f4d245ae321f1e729344d968a99aa9bcccf940a957641c"
        );
        let sig = "0xf810500a3968dc0fa803484d555ae3cecf0b9306fc019c0410fa9b7f6a2dcde0026106f2acf5ed65d843f125f6824751d08875d3e878730434d7effc563766801b";
        assert_eq!(auth.signer(&domain, sig).unwrap(), auth.from);
        // Another domain (chain, token name or contract) or another field: another signer.
        assert_ne!(auth.signer(&token_domain("USDC", "2", 8453, asset), sig).unwrap(), auth.from);
        assert_ne!(auth.signer(&token_domain("USD Coin", "2", 84532, asset), sig).unwrap(), auth.from);
        let mut other = auth.clone();
        other.value = U256::from(1);
        assert_ne!(other.signer(&domain, sig).ok(), Some(auth.from));
        for bad in ["", "0x", "0x1234", &format!("0x{}", "zz".repeat(65)), &format!("{}00", sig)] {
            assert!(auth.signer(&domain, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity(&json!("0x1a")).unwrap(), 26);
        assert!(quantity(&json!("26")).is_err());
        assert!(quantity(&json!(26)).is_err());
        assert_eq!(eip155_chain_id("eip155:84532"), Some(84532));
        assert_eq!(eip155_chain_id("solana:x"), None);
    }
}
