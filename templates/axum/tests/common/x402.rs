//! x402 test doubles, served over HTTP: a deterministic facilitator (/verify, /settle, with the
//! faults a real one shows: settled-then-500, settled-then-hang, `settlement_pending`) and a
//! deterministic EVM JSON-RPC chain (eth_blockNumber, eth_getLogs, eth_call of
//! authorizationState) whose state the facilitator's settlements change. And a payer with a real
//! secp256k1 key: every payment these tests send is really signed (EIP-712, EIP-3009).
//!
//! The real chain path (anvil, Circle's FiatToken, the official @x402 facilitator) runs when
//! TEST_X402_CHAIN holds the JSON line of tests/chain/chain.mjs (see tests/signup_pending.rs).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use gateway::keys::sha256_hex;
use serde_json::{Value, json};

use super::Gate;

/// keccak256("AuthorizationUsed(address,bytes32)"), written out (not computed by the gateway's code).
pub const AUTHORIZATION_USED_TOPIC: &str = "0x98de503528ee59b575ef0c0a2576a82497bfc029a5685b209e9ec333479b10a5";
/// The selector of authorizationState(address,bytes32).
pub const AUTHORIZATION_STATE_SELECTOR: &str = "0xe94a0102";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Answer {
    Ok,
    /// verify: isValid false; settle: success false (HTTP 200). No money moves.
    Refuse,
    /// The same refusals with a 4xx status (as e.g. the x402-rs facilitator answers them).
    RefuseWithStatus,
    /// 500 without settling (a `success: false` body on /settle: a 5xx is not a refusal).
    Http500,
    /// settle: the transfer happens on the chain, then the facilitator answers 500.
    SettleThen500,
    /// settle: the transfer happens, then the facilitator answers nothing for 30 s.
    SettleThenHang,
    /// settle: the transfer happens; the answer is the official facilitator's
    /// `success: false, errorReason: "settlement_pending"` with the transaction hash.
    SettlementPending,
}

// ------------------------------------------------------------------------ the chain

/// A deterministic EVM JSON-RPC endpoint holding the EIP-3009 state of one token.
pub struct FakeChain {
    pub url: String,
    pub state: Arc<ChainState>,
}

#[derive(Default)]
pub struct ChainState {
    block: Mutex<u64>,
    /// (from, nonce), lowercase → (transaction, block).
    used: Mutex<HashMap<(String, String), (String, u64)>>,
    cancelled: Mutex<HashSet<(String, String)>>,
    /// Every call: the method.
    calls: Mutex<Vec<String>>,
    transfers: AtomicUsize,
    /// Answer 503 to everything.
    pub down: AtomicBool,
    /// Seconds the chain's block clock runs ahead of (negative: behind) this machine's.
    pub clock_offset_secs: std::sync::atomic::AtomicI64,
}

fn rpc_reply(id: &Value, result: Value) -> Reply {
    reply(StatusCode::OK, json!({ "jsonrpc": "2.0", "id": id, "result": result }))
}

async fn chain_rpc(State(st): State<Arc<ChainState>>, body: Bytes) -> Reply {
    if st.down.load(Ordering::SeqCst) {
        return reply(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "down" }));
    }
    let req: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(req["jsonrpc"], "2.0", "{req}");
    let id = req["id"].clone();
    let method = req["method"].as_str().unwrap().to_string();
    st.calls.lock().unwrap().push(method.clone());
    let params = &req["params"];
    match method.as_str() {
        "eth_blockNumber" => rpc_reply(&id, json!(format!("0x{:x}", *st.block.lock().unwrap()))),
        "eth_getBlockByNumber" => {
            // latest: the last block; pending: the next one, stamped with the chain's clock.
            let tag = params[0].as_str().unwrap();
            assert!(tag == "latest" || tag == "pending", "{params}");
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            let ts = now + st.clock_offset_secs.load(Ordering::SeqCst) - i64::from(tag == "latest");
            let block = *st.block.lock().unwrap() + u64::from(tag == "pending");
            rpc_reply(&id, json!({ "number": format!("0x{block:x}"), "timestamp": format!("0x{:x}", ts.max(0)), "transactions": [] }))
        }
        "eth_getLogs" => {
            let f = &params[0];
            assert_eq!(f["topics"][0], AUTHORIZATION_USED_TOPIC, "{f}");
            assert_eq!(f["toBlock"], "latest");
            let topic1 = f["topics"][1].as_str().unwrap().to_lowercase();
            assert_eq!(topic1.len(), 66);
            assert!(topic1[2..26].bytes().all(|b| b == b'0'), "an address padded to 32 bytes: {topic1}");
            let from = format!("0x{}", &topic1[26..]);
            let nonce = f["topics"][2].as_str().unwrap().to_lowercase();
            let from_block = u64::from_str_radix(f["fromBlock"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
            let logs: Vec<Value> = st
                .used
                .lock()
                .unwrap()
                .get(&(from, nonce))
                .filter(|(_, block)| *block >= from_block)
                .map(|(tx, block)| {
                    json!({ "address": f["address"], "topics": f["topics"], "data": "0x", "blockNumber": format!("0x{block:x}"),
                            "transactionHash": tx, "logIndex": "0x0", "removed": false })
                })
                .into_iter()
                .collect();
            rpc_reply(&id, json!(logs))
        }
        "eth_call" => {
            let data = params[0]["data"].as_str().unwrap().to_lowercase();
            assert!(data.starts_with(AUTHORIZATION_STATE_SELECTOR) && data.len() == 10 + 128, "{data}");
            assert_eq!(params[1], "latest");
            let from = format!("0x{}", &data[10 + 24..10 + 64]);
            let nonce = format!("0x{}", &data[10 + 64..]);
            let key = (from, nonce);
            let state = st.used.lock().unwrap().contains_key(&key) || st.cancelled.lock().unwrap().contains(&key);
            rpc_reply(&id, json!(format!("0x{:064x}", u8::from(state))))
        }
        _ => reply(StatusCode::OK, json!({ "jsonrpc": "2.0", "id": id, "error": { "code": -32601, "message": "method not found" } })),
    }
}

impl FakeChain {
    pub async fn start() -> FakeChain {
        let state = Arc::new(ChainState::default());
        *state.block.lock().unwrap() = 100;
        let app = axum::Router::new().route("/", post(chain_rpc)).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeChain { url, state }
    }
}

impl ChainState {
    /// Uses the authorization (from, nonce) in a new block; None when already used or cancelled.
    pub fn transfer(&self, from: &str, nonce: &str) -> Option<String> {
        let key = (from.to_lowercase(), nonce.to_lowercase());
        if self.cancelled.lock().unwrap().contains(&key) {
            return None;
        }
        let mut used = self.used.lock().unwrap();
        if used.contains_key(&key) {
            return None;
        }
        let mut block = self.block.lock().unwrap();
        *block += 1;
        let tx = format!("0x{}", sha256_hex(&format!("{}{}", key.0, key.1)));
        used.insert(key, (tx.clone(), *block));
        self.transfers.fetch_add(1, Ordering::SeqCst);
        Some(tx)
    }

    /// The payer cancels the authorization (EIP-3009 cancelAuthorization).
    pub fn cancel(&self, from: &str, nonce: &str) {
        self.cancelled.lock().unwrap().insert((from.to_lowercase(), nonce.to_lowercase()));
    }

    /// Moves the chain on without transfers.
    pub fn mine(&self, blocks: u64) {
        *self.block.lock().unwrap() += blocks;
    }

    /// How many transfers happened (money moved).
    pub fn transfers(&self) -> usize {
        self.transfers.load(Ordering::SeqCst)
    }

    pub fn calls(&self, method: &str) -> usize {
        self.calls.lock().unwrap().iter().filter(|m| *m == method).count()
    }

    pub fn all_calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

// ------------------------------------------------------------------------ the facilitator

/// A deterministic facilitator: /verify and /settle over HTTP, as the x402 spec defines them;
/// a settlement moves the money on its [`FakeChain`].
pub struct Facilitator {
    pub url: String,
    pub state: Arc<FacilitatorState>,
    pub chain: FakeChain,
}

pub struct FacilitatorState {
    verify: Mutex<Answer>,
    settle: Mutex<Answer>,
    /// Each call: path, JSON body, `Authorization` header.
    calls: Mutex<Vec<(&'static str, Value, Option<String>)>>,
    gate: Option<Arc<Gate>>,
    chain: Arc<ChainState>,
}

type Reply = (StatusCode, [(&'static str, &'static str); 1], String);

fn reply(status: StatusCode, body: Value) -> Reply {
    (status, [("content-type", "application/json")], body.to_string())
}

fn authorization_of(headers: &HeaderMap) -> Option<String> {
    headers.get("authorization").map(|v| v.to_str().unwrap().to_string())
}

async fn facilitator_verify(State(st): State<Arc<FacilitatorState>>, headers: HeaderMap, body: Bytes) -> Reply {
    let body: Value = serde_json::from_slice(&body).unwrap();
    st.calls.lock().unwrap().push(("verify", body.clone(), authorization_of(&headers)));
    if let Some(g) = &st.gate {
        g.pass().await;
    }
    let from = body["paymentPayload"]["payload"]["authorization"]["from"].clone();
    let answer = *st.verify.lock().unwrap();
    match answer {
        Answer::Refuse => reply(StatusCode::OK, json!({ "isValid": false, "invalidReason": "invalid_exact_evm_payload_signature", "payer": from })),
        Answer::RefuseWithStatus => reply(
            StatusCode::BAD_REQUEST,
            json!({ "isValid": false, "invalidReason": "invalid_exact_evm_payload_authorization_valid_before", "invalidReasonDetails": "expired", "payer": "" }),
        ),
        Answer::Http500 => reply(StatusCode::INTERNAL_SERVER_ERROR, json!({ "error": "boom" })),
        _ => reply(StatusCode::OK, json!({ "isValid": true, "payer": from })),
    }
}

async fn facilitator_settle(State(st): State<Arc<FacilitatorState>>, headers: HeaderMap, body: Bytes) -> Reply {
    let body: Value = serde_json::from_slice(&body).unwrap();
    st.calls.lock().unwrap().push(("settle", body.clone(), authorization_of(&headers)));
    let auth = &body["paymentPayload"]["payload"]["authorization"];
    let (from, nonce) = (auth["from"].as_str().unwrap_or(""), auth["nonce"].as_str().unwrap_or(""));
    let network = body["paymentRequirements"]["network"].clone();
    let answer = *st.settle.lock().unwrap();
    let moves = matches!(answer, Answer::Ok | Answer::SettleThen500 | Answer::SettleThenHang | Answer::SettlementPending);
    let tx = if moves { st.chain.transfer(from, nonce) } else { None };
    if moves && tx.is_none() {
        return reply(
            StatusCode::OK,
            json!({ "success": false, "errorReason": "invalid_exact_evm_payload_authorization_nonce_used", "transaction": "", "network": network, "payer": from }),
        );
    }
    match answer {
        Answer::Ok => reply(StatusCode::OK, json!({ "success": true, "transaction": tx, "network": network, "payer": from })),
        Answer::Refuse => {
            reply(StatusCode::OK, json!({ "success": false, "errorReason": "insufficient_funds", "transaction": "", "network": network }))
        }
        Answer::RefuseWithStatus => reply(
            StatusCode::BAD_REQUEST,
            json!({ "success": false, "network": "", "transaction": "", "errorReason": "unexpected_settle_error", "errorMessage": "reverted", "payer": "" }),
        ),
        Answer::Http500 | Answer::SettleThen500 => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "success": false, "network": "", "transaction": "", "errorReason": "unexpected_settle_error", "payer": "" }),
        ),
        Answer::SettleThenHang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            reply(StatusCode::OK, json!({ "success": true, "transaction": tx, "network": network, "payer": from }))
        }
        Answer::SettlementPending => reply(
            StatusCode::OK,
            json!({ "success": false, "errorReason": "settlement_pending", "transaction": tx, "network": network, "payer": from }),
        ),
    }
}

impl Facilitator {
    pub async fn start(gate: Option<Arc<Gate>>) -> Facilitator {
        let chain = FakeChain::start().await;
        let state = Arc::new(FacilitatorState {
            verify: Mutex::new(Answer::Ok),
            settle: Mutex::new(Answer::Ok),
            calls: Mutex::new(Vec::new()),
            gate,
            chain: chain.state.clone(),
        });
        let app = axum::Router::new()
            .route("/facilitator/verify", post(facilitator_verify))
            .route("/facilitator/settle", post(facilitator_settle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/facilitator", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Facilitator { url, state, chain }
    }

    pub fn set(&self, verify: Answer, settle: Answer) {
        *self.state.verify.lock().unwrap() = verify;
        *self.state.settle.lock().unwrap() = settle;
    }

    pub fn calls(&self, path: &str) -> Vec<Value> {
        self.state.calls.lock().unwrap().iter().filter(|(p, ..)| *p == path).map(|(_, b, _)| b.clone()).collect()
    }

    /// The `Authorization` header of each call, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.state.calls.lock().unwrap().iter().map(|(.., a)| a.clone()).collect()
    }
}

// ------------------------------------------------------------------------ the payer

/// A payer with a real secp256k1 key.
pub struct Payer {
    key: k256::ecdsa::SigningKey,
    /// 0x + 40 lowercase hex.
    pub address: String,
}

impl Payer {
    /// The payer whose private key is 32 bytes of `seed` (any seed 1..=100 is a valid key).
    pub fn new(seed: u8) -> Payer {
        Payer::from_key(&[seed; 32])
    }

    pub fn from_hex(key: &str) -> Payer {
        Payer::from_key(&hex::decode(key.trim_start_matches("0x")).unwrap())
    }

    fn from_key(bytes: &[u8]) -> Payer {
        let key = k256::ecdsa::SigningKey::from_slice(bytes).unwrap();
        let address = alloy_primitives::Address::from_public_key(key.verifying_key());
        Payer { key, address: format!("0x{}", hex::encode(address.as_slice())) }
    }

    /// The 65-byte signature (r‖s‖v, v = 27/28) of `authorization` for the token of `accepted`
    /// (its asset, network and extra.name / extra.version: the EIP-712 domain).
    pub fn sign(&self, authorization: &Value, accepted: &Value) -> String {
        use gateway::signup::chain::{Authorization, eip155_chain_id, token_domain};
        let domain = token_domain(
            accepted["extra"]["name"].as_str().unwrap(),
            accepted["extra"]["version"].as_str().unwrap(),
            eip155_chain_id(accepted["network"].as_str().unwrap()).unwrap(),
            accepted["asset"].as_str().unwrap().parse().unwrap(),
        );
        let hash = Authorization::parse(authorization).unwrap().signing_hash(&domain);
        let (sig, recid) = self.key.sign_prehash_recoverable(hash.as_slice()).unwrap();
        let mut bytes = sig.to_bytes().to_vec();
        bytes.push(27 + recid.to_byte());
        format!("0x{}", hex::encode(bytes))
    }

    /// An EIP-3009 authorization paying `accepted` (valid until `valid_before`, in seconds).
    pub fn authorization(&self, accepted: &Value, nonce: &str, valid_before: u64) -> Value {
        json!({
            "from": self.address, "to": accepted["payTo"], "value": accepted["amount"],
            "validAfter": "0", "validBefore": valid_before.to_string(), "nonce": nonce,
        })
    }

    /// `{signature, authorization}`, really signed.
    pub fn payload(&self, accepted: &Value, nonce: &str, valid_before: u64) -> Value {
        let authorization = self.authorization(accepted, nonce, valid_before);
        json!({ "signature": self.sign(&authorization, accepted), "authorization": authorization })
    }

    /// A PAYMENT-SIGNATURE (v2) header value.
    pub fn header(&self, accepted: &Value, nonce: &str, valid_before: u64) -> String {
        B64.encode(json!({ "x402Version": 2, "accepted": accepted, "payload": self.payload(accepted, nonce, valid_before) }).to_string())
    }
}

/// Far in the future (seconds).
pub const FOREVER: u64 = 99_999_999_999;

pub fn nonce(n: u64) -> String {
    format!("0x{n:064x}")
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}
