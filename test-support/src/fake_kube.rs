//! **A fake Kubernetes API server.** There is no real one on these
//! machines, so this serves what fedmesh's Kubernetes code uses, over real
//! HTTP/1.1 on loopback, in the API server's wire format:
//!
//! - list and watch of Services, EndpointSlices, ServiceExports and
//!   ServiceImports, cluster-wide or per namespace, with `labelSelector`;
//! - `resourceVersion` on every object and list; watches replay from a
//!   version, stream chunked `ADDED`/`MODIFIED`/`DELETED` events, send
//!   `BOOKMARK`s when asked to, and answer a version older than the
//!   history kept ([`FakeKube::compact`]) with a `410 Gone` `ERROR` event;
//! - create, JSON merge patch, server-side apply (as an upsert of the
//!   fields sent), replace and delete, on objects and their `status`;
//! - `TokenReview`s, answered from tokens the test registers.
//!
//! A test can drop every connection ([`FakeKube::drop_connections`]), or
//! stop the server and start it again on the same address
//! ([`FakeKube::stop`], [`FakeKube::resume`]).
//!
//! What it does not do, and a real cluster would check (see the kube
//! crate's README for a kind run): schema validation and defaulting,
//! admission, RBAC, field ownership conflicts of server-side apply,
//! pagination (`limit` is ignored: one page), field selectors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

/// A resource the fake serves: `(group, version, plural, kind)`.
const RESOURCES: &[(&str, &str, &str, &str)] = &[
    ("", "v1", "services", "Service"),
    ("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    (
        "multicluster.x-k8s.io",
        "v1alpha1",
        "serviceexports",
        "ServiceExport",
    ),
    (
        "multicluster.x-k8s.io",
        "v1alpha1",
        "serviceimports",
        "ServiceImport",
    ),
];

/// Requests the fake has seen, for tests to assert on.
#[derive(Debug, Default)]
pub struct FakeKubeStats {
    pub lists: AtomicU64,
    pub watches: AtomicU64,
    /// Watches answered with `410 Gone`.
    pub gone: AtomicU64,
    pub bookmarks: AtomicU64,
    pub writes: AtomicU64,
    pub token_reviews: AtomicU64,
}

#[derive(Debug, Clone)]
struct Stored {
    plural: &'static str,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    type_: &'static str,
    rv: u64,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// `(plural, namespace, name)` to the object.
    objects: BTreeMap<(&'static str, String, String), Value>,
    history: Vec<Stored>,
    /// Watches from a version below this get `410 Gone`.
    floor: u64,
    namespaces: BTreeSet<String>,
    /// Token to (username, audiences).
    tokens: HashMap<String, (String, Vec<String>)>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Stored>,
    stats: FakeKubeStats,
    /// Bumped to drop every open connection.
    generation: watch::Sender<u64>,
    bookmark_every: Duration,
}

/// The fake server. Dropping it stops it.
#[derive(Debug)]
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeKube {
    /// Starts on a free port of `ip` (a loopback address), sending watch
    /// bookmarks every `bookmark_every` to watches that allow them.
    pub async fn start(ip: &str, bookmark_every: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                ..State::default()
            }),
            events: broadcast::channel(4096).0,
            stats: FakeKubeStats::default(),
            generation: watch::channel(0).0,
            bookmark_every,
        });
        let server = Some(tokio::spawn(serve(listener, shared.clone())));
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    /// `http://<addr>`, for a kube client's `Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &FakeKubeStats {
        &self.shared.stats
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared).rv
    }

    /// Makes a namespace exist (objects put in one make it exist too).
    pub fn add_namespace(&self, ns: &str) {
        lock(&self.shared).namespaces.insert(ns.into());
    }

    /// Lets `token` authenticate as `username` for `audiences`.
    pub fn add_token(&self, token: &str, username: &str, audiences: &[&str]) {
        lock(&self.shared).tokens.insert(
            token.into(),
            (
                username.into(),
                audiences.iter().map(|a| a.to_string()).collect(),
            ),
        );
    }

    /// Creates or replaces an object (any serialisable k8s-openapi or MCS
    /// object with `apiVersion`, `kind` and `metadata`), as a user's
    /// `kubectl apply` would. Returns its new resourceVersion.
    pub fn put(&self, object: &impl serde::Serialize) -> u64 {
        let v = serde_json::to_value(object).expect("a serialisable object");
        let (plural, kind) = resource_of(&v).expect("a kind the fake serves");
        let (ns, name) = ns_name(&v);
        let mut st = lock(&self.shared);
        st.namespaces.insert(ns.clone());
        let old = st.objects.get(&(plural, ns.clone(), name.clone())).cloned();
        upsert(&self.shared, &mut st, plural, kind, &ns, &name, old, v)
    }

    /// Deletes an object; false when there was none.
    pub fn delete(&self, plural: &str, ns: &str, name: &str) -> bool {
        let Some(plural) = plural_of(plural) else {
            return false;
        };
        let mut st = lock(&self.shared);
        remove(&self.shared, &mut st, plural, ns, name).is_some()
    }

    /// An object as the server holds it now.
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let plural = plural_of(plural)?;
        lock(&self.shared)
            .objects
            .get(&(plural, ns.into(), name.into()))
            .cloned()
    }

    /// Every object of a kind, by `(namespace, name)`.
    pub fn list(&self, plural: &str) -> BTreeMap<(String, String), Value> {
        let Some(plural) = plural_of(plural) else {
            return BTreeMap::new();
        };
        lock(&self.shared)
            .objects
            .iter()
            .filter(|((p, _, _), _)| *p == plural)
            .map(|((_, ns, n), v)| ((ns.clone(), n.clone()), v.clone()))
            .collect()
    }

    /// Forgets the event history: a watch resuming from any version seen
    /// so far gets `410 Gone` and must list again.
    pub fn compact(&self) {
        let mut st = lock(&self.shared);
        st.history.clear();
        st.floor = st.rv + 1;
    }

    /// Cuts every open connection (watches included) mid-stream.
    pub fn drop_connections(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Stops the server: every connection cut, new ones refused. The
    /// objects and their history stay, as an API server's etcd does.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
        self.drop_connections();
    }

    /// Serves again on the same address after [`Self::stop`].
    pub async fn resume(&mut self) -> std::io::Result<()> {
        if self.server.is_none() {
            let listener = TcpListener::bind(self.addr).await?;
            self.server = Some(tokio::spawn(serve(listener, self.shared.clone())));
        }
        Ok(())
    }
}

fn plural_of(p: &str) -> Option<&'static str> {
    RESOURCES.iter().map(|r| r.2).find(|x| *x == p)
}

fn resource_of(v: &Value) -> Option<(&'static str, &'static str)> {
    let kind = v.get("kind")?.as_str()?;
    RESOURCES.iter().find(|r| r.3 == kind).map(|r| (r.2, r.3))
}

fn api_version_of(plural: &str) -> String {
    let r = RESOURCES.iter().find(|r| r.2 == plural);
    match r {
        Some(("", v, _, _)) => (*v).to_string(),
        Some((g, v, _, _)) => format!("{g}/{v}"),
        None => "v1".into(),
    }
}

fn ns_name(v: &Value) -> (String, String) {
    let m = &v["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().into(),
        m["name"].as_str().unwrap_or_default().into(),
    )
}

/// Stores `new` in place of `old` (`None`: created), stamping metadata and
/// recording the event. Returns the new resourceVersion.
#[allow(clippy::too_many_arguments)]
fn upsert(
    shared: &Shared,
    st: &mut State,
    plural: &'static str,
    kind: &'static str,
    ns: &str,
    name: &str,
    old: Option<Value>,
    mut new: Value,
) -> u64 {
    st.rv += 1;
    let rv = st.rv;
    new["apiVersion"] = json!(api_version_of(plural));
    new["kind"] = json!(kind);
    let generation = match &old {
        None => 1,
        Some(o) => {
            let g = o["metadata"]["generation"].as_i64().unwrap_or(1);
            if o.get("spec") != new.get("spec") {
                g + 1
            } else {
                g
            }
        }
    };
    let meta = &mut new["metadata"];
    meta["resourceVersion"] = json!(rv.to_string());
    meta["namespace"] = json!(ns);
    meta["name"] = json!(name);
    meta["generation"] = json!(generation);
    meta["uid"] = old
        .as_ref()
        .map(|o| o["metadata"]["uid"].clone())
        .unwrap_or_else(|| json!(format!("uid-{plural}-{ns}-{name}-{rv}")));
    if meta.get("creationTimestamp").is_none_or(Value::is_null) {
        meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    st.objects
        .insert((plural, ns.into(), name.into()), new.clone());
    let ev = Stored {
        plural,
        type_: if old.is_some() { "MODIFIED" } else { "ADDED" },
        rv,
        object: new,
    };
    st.history.push(ev.clone());
    let _ = shared.events.send(ev);
    rv
}

fn remove(
    shared: &Shared,
    st: &mut State,
    plural: &'static str,
    ns: &str,
    name: &str,
) -> Option<Value> {
    let mut obj = st.objects.remove(&(plural, ns.into(), name.into()))?;
    st.rv += 1;
    let rv = st.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    let ev = Stored {
        plural,
        type_: "DELETED",
        rv,
        object: obj.clone(),
    };
    st.history.push(ev.clone());
    let _ = shared.events.send(ev);
    Some(obj)
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let mut generation = shared.generation.subscribe();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            // A bumped generation drops the connection mid-whatever.
            tokio::select! {
                _ = conn => {}
                _ = generation.changed() => {}
            }
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("valid"));
    r
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

/// A request's target: `/api/v1/...` or `/apis/<group>/<version>/...`,
/// then `[namespaces/<ns>/]<plural>[/<name>[/status]]`.
#[derive(Debug)]
struct Target {
    group: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    status: bool,
}

fn parse_target(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", g, _v, rest @ ..] => ((*g).to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
        r => (None, r),
    };
    let (plural, name, status) = match rest {
        [p] => (*p, None, false),
        [p, n] => (*p, Some((*n).to_string()), false),
        [p, n, "status"] => (*p, Some((*n).to_string()), true),
        _ => return None,
    };
    Some(Target {
        group,
        namespace,
        plural: plural.into(),
        name,
        status,
    })
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            Some((k.to_string(), percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `k=v,k2==v2`: equality selectors only.
fn matches_selector(obj: &Value, selector: Option<&String>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    sel.split(',').all(|term| {
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .unwrap_or((term, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let Some(t) = parse_target(req.uri().path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the fake serves no such path",
        );
    };
    if t.group == "authentication.k8s.io" && t.plural == "tokenreviews" {
        return token_review(shared, req).await;
    }
    let Some(plural) = plural_of(&t.plural) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "the server could not find the requested resource ({})",
                t.plural
            ),
        );
    };
    let q = query(&req);
    match (req.method().clone(), &t.name) {
        (Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            watch_stream(shared, plural, t.namespace, &q)
        }
        (Method::GET, None) => list(shared, plural, t.namespace.as_deref(), &q),
        (Method::GET, Some(name)) => {
            let ns = t.namespace.unwrap_or_default();
            match lock(shared).objects.get(&(plural, ns, name.clone())) {
                Some(o) => respond(StatusCode::OK, o),
                None => not_found(&t.plural, name),
            }
        }
        (Method::DELETE, Some(name)) => {
            shared.stats.writes.fetch_add(1, Ordering::Relaxed);
            let ns = t.namespace.unwrap_or_default();
            let mut st = lock(shared);
            match remove(shared, &mut st, plural, &ns, name) {
                Some(o) => respond(StatusCode::OK, &o),
                None => not_found(&t.plural, name),
            }
        }
        (m @ (Method::POST | Method::PUT | Method::PATCH), _) => {
            shared.stats.writes.fetch_add(1, Ordering::Relaxed);
            let ctype = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let Ok(body) = req.into_body().collect().await else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
            };
            let Ok(body) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the body is not JSON",
                );
            };
            write(shared, plural, &t, m, &ctype, body)
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not served by the fake",
        ),
    }
}

fn not_found(plural: &str, name: &str) -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{plural} \"{name}\" not found"),
    )
}

fn list(
    shared: &Shared,
    plural: &'static str,
    ns: Option<&str>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    shared.stats.lists.fetch_add(1, Ordering::Relaxed);
    let st = lock(shared);
    let items: Vec<&Value> = st
        .objects
        .iter()
        .filter(|((p, n, _), o)| {
            *p == plural
                && ns.is_none_or(|ns| ns == n)
                && matches_selector(o, q.get("labelSelector"))
        })
        .map(|(_, o)| o)
        .collect();
    let kind = RESOURCES
        .iter()
        .find(|r| r.2 == plural)
        .map(|r| r.3)
        .unwrap_or_default();
    respond(
        StatusCode::OK,
        &json!({
            "apiVersion": api_version_of(plural),
            "kind": format!("{kind}List"),
            "metadata": { "resourceVersion": st.rv.to_string() },
            "items": items,
        }),
    )
}

fn line(v: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut s = v.to_string();
    s.push('\n');
    Ok(Frame::data(Bytes::from(s)))
}

fn watch_stream(
    shared: &Arc<Shared>,
    plural: &'static str,
    ns: Option<String>,
    q: &HashMap<String, String>,
) -> Response<Body> {
    shared.stats.watches.fetch_add(1, Ordering::Relaxed);
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let selector = q.get("labelSelector").cloned();
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let wanted = move |e: &Stored| {
        e.plural == plural
            && ns
                .as_deref()
                .is_none_or(|ns| e.object["metadata"]["namespace"].as_str() == Some(ns))
            && matches_selector(&e.object, selector.as_ref())
    };
    // Subscribe before reading the history, so that nothing falls between.
    let mut live = shared.events.subscribe();
    let (backlog, gone, mut last) = {
        let st = lock(shared);
        if from != 0 && from < st.floor {
            (Vec::new(), true, st.rv)
        } else {
            let backlog: Vec<Stored> = st
                .history
                .iter()
                .filter(|e| e.rv > from && wanted(e))
                .cloned()
                .collect();
            (backlog, false, from.max(st.rv))
        }
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        if gone {
            shared.stats.gone.fetch_add(1, Ordering::Relaxed);
            let _ = tx
                .send(line(&json!({
                    "type": "ERROR",
                    "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {from}"),
                    }
                })))
                .await;
            return;
        }
        let mut sent_up_to = from;
        for e in backlog {
            sent_up_to = e.rv;
            if tx.send(line(&event(&e))).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let mut bookmark = tokio::time::interval(shared.bookmark_every);
        bookmark.tick().await;
        loop {
            tokio::select! {
                e = live.recv() => match e {
                    Ok(e) if e.rv > sent_up_to && wanted(&e) => {
                        sent_up_to = e.rv;
                        last = last.max(e.rv);
                        if tx.send(line(&event(&e))).await.is_err() { return; }
                    }
                    Ok(e) => last = last.max(e.rv),
                    // Too slow to keep up: end the watch, the client resumes.
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = bookmark.tick(), if bookmarks => {
                    shared.stats.bookmarks.fetch_add(1, Ordering::Relaxed);
                    let rv = last.max(sent_up_to);
                    let kind = RESOURCES.iter().find(|r| r.2 == plural).map(|r| r.3).unwrap_or_default();
                    let b = json!({
                        "type": "BOOKMARK",
                        "object": {
                            "kind": kind, "apiVersion": api_version_of(plural),
                            "metadata": { "resourceVersion": rv.to_string() },
                        }
                    });
                    if tx.send(line(&b)).await.is_err() { return; }
                }
                _ = &mut end => return,
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = Response::new(BodyExt::boxed(body));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("valid"));
    r
}

fn event(e: &Stored) -> Value {
    json!({ "type": e.type_, "object": e.object })
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in p {
                if v.is_null() {
                    if let Some(t) = target.as_object_mut() {
                        t.remove(k);
                    }
                } else {
                    merge(&mut target[k], v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn write(
    shared: &Shared,
    plural: &'static str,
    t: &Target,
    method: Method,
    ctype: &str,
    body: Value,
) -> Response<Body> {
    let ns = t.namespace.clone().unwrap_or_default();
    let name = t
        .name
        .clone()
        .or_else(|| body["metadata"]["name"].as_str().map(String::from))
        .unwrap_or_default();
    if name.is_empty() {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value",
        );
    }
    let kind = RESOURCES
        .iter()
        .find(|r| r.2 == plural)
        .map(|r| r.3)
        .unwrap_or_default();
    let mut st = lock(shared);
    if !st.namespaces.contains(&ns) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("namespaces \"{ns}\" not found"),
        );
    }
    let old = st.objects.get(&(plural, ns.clone(), name.clone())).cloned();
    let apply = ctype.starts_with("application/apply-patch");
    let new = match (method.as_str(), &old) {
        ("POST", Some(_)) => {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{} \"{name}\" already exists", t.plural),
            );
        }
        ("POST" | "PUT", None) if !t.status => body,
        ("PATCH", None) if apply && !t.status => body,
        (_, None) => return not_found(&t.plural, &name),
        ("PUT", Some(o)) => {
            let mut n = body;
            if t.status {
                let mut keep = o.clone();
                keep["status"] = n["status"].take();
                keep
            } else {
                n["status"] = o["status"].clone();
                n
            }
        }
        ("PATCH", Some(o)) => {
            let mut n = o.clone();
            if apply {
                // The fields we were sent are ours: replace them whole.
                let part = if t.status { "status" } else { "spec" };
                if body.get(part).is_some() {
                    n[part] = body[part].clone();
                }
                if !t.status
                    && let Some(labels) = body["metadata"].get("labels")
                {
                    merge(&mut n["metadata"]["labels"], labels);
                }
            } else if t.status {
                merge(&mut n["status"], &body["status"]);
            } else {
                merge(&mut n, &body);
            }
            n
        }
        _ => {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not served by the fake",
            );
        }
    };
    let new = if old.is_none() && !t.status {
        // Status is written through its subresource only.
        let mut n = new;
        if let Some(o) = n.as_object_mut() {
            o.remove("status");
        }
        n
    } else {
        new
    };
    upsert(shared, &mut st, plural, kind, &ns, &name, old.clone(), new);
    let stored = st.objects[&(plural, ns, name)].clone();
    respond(
        if old.is_some() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        &stored,
    )
}

async fn token_review(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    shared.stats.token_reviews.fetch_add(1, Ordering::Relaxed);
    if req.method() != Method::POST {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "POST a TokenReview",
        );
    }
    let Ok(body) = req.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let Ok(mut review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        );
    };
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    let known = lock(shared).tokens.get(&token).cloned();
    review["status"] = match known {
        None => json!({ "authenticated": false, "error": "invalid bearer token" }),
        Some((user, audiences)) => {
            let both: Vec<&String> = if asked.is_empty() {
                audiences.iter().collect()
            } else {
                asked.iter().filter(|a| audiences.contains(a)).collect()
            };
            if both.is_empty() {
                json!({ "authenticated": false, "error": "token audiences are invalid" })
            } else {
                json!({
                    "authenticated": true,
                    "user": { "username": user, "groups": ["system:serviceaccounts"] },
                    "audiences": both,
                })
            }
        }
    };
    review["apiVersion"] = json!("authentication.k8s.io/v1");
    review["kind"] = json!("TokenReview");
    respond(StatusCode::CREATED, &review)
}
