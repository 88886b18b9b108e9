//! Paging, the same for every list endpoint: `?limit=N` (default 100, at
//! most 1,000) and `?cursor=C`, where C is the previous page's
//! `next_cursor` (absent or null on the last page). A cursor is opaque to
//! clients: base64url of the list's name and the sort key of the last item
//! served, so a page starts after that item however the list changed
//! meanwhile, and a cursor from one list is refused by another.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::ApiError;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// A list request's query, kept as sent: handlers read it after the caller
/// is authorized, so a caller who may not list is told so (403), not what
/// is wrong with its query (400).
pub struct PageQuery(Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self(parts.uri.query().map(str::to_owned)))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct CursorContent<K> {
    list: String,
    after: K,
}

/// One page's request, checked: how many items, after which sort key.
pub struct Page<K> {
    pub limit: usize,
    pub after: Option<K>,
    list: &'static str,
}

impl PageQuery {
    /// The page asked of `list`, whose sort key is `K`.
    pub fn page<K: DeserializeOwned>(&self, list: &'static str) -> Result<Page<K>, ApiError> {
        let raw: RawQuery = serde_urlencoded::from_str(self.0.as_deref().unwrap_or_default())
            .map_err(|e| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("a list takes only limit and cursor: {e}"),
                )
            })?;
        let limit = match raw.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request("invalid_limit", format!("limit is 1 to {MAX_LIMIT}"))
                })?,
        };
        let after = match raw.cursor.as_deref() {
            None => None,
            Some(cursor) => Some(decode(cursor, list)?),
        };
        Ok(Page { limit, after, list })
    }
}

fn decode<K: DeserializeOwned>(cursor: &str, list: &str) -> Result<K, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "invalid_cursor",
            "the cursor is not a next_cursor of this list",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    let content: CursorContent<K> = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if content.list != list {
        return Err(invalid());
    }
    Ok(content.after)
}

impl<K: Serialize> Page<K> {
    /// How many items to fetch: one more than the page, to know whether
    /// another page follows.
    pub fn fetch(&self) -> i64 {
        self.limit as i64 + 1
    }

    /// The page of `fetched` (as many as `fetch` asked for) and the cursor
    /// of the next page, made from the last item's sort key.
    pub fn split<T>(&self, mut fetched: Vec<T>, key: impl Fn(&T) -> K) -> (Vec<T>, Option<String>) {
        if fetched.len() <= self.limit {
            return (fetched, None);
        }
        fetched.truncate(self.limit);
        let next = fetched.last().map(|last| {
            let content = CursorContent {
                list: self.list.to_owned(),
                after: key(last),
            };
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&content).expect("plain data serializes"))
        });
        (fetched, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(q: &str) -> PageQuery {
        PageQuery(Some(q.to_owned()))
    }

    #[test]
    fn pages_follow_each_other_through_their_cursors() {
        let items: Vec<u32> = (1..=7).collect();
        let mut cursor: Option<String> = None;
        let mut seen = Vec::new();
        loop {
            let q = match &cursor {
                Some(c) => query(&format!("limit=3&cursor={c}")),
                None => query("limit=3"),
            };
            let page = q.page::<u32>("numbers").unwrap();
            let fetched: Vec<u32> = items
                .iter()
                .copied()
                .filter(|i| page.after.is_none_or(|a| *i > a))
                .take(page.fetch() as usize)
                .collect();
            let (got, next) = page.split(fetched, |i| *i);
            seen.extend(got);
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(seen, items);
    }

    #[test]
    fn bad_limits_cursors_and_parameters_are_refused_by_code() {
        let code = |q: &str| query(q).page::<u32>("numbers").err().map(|e| e.code);
        assert_eq!(code("limit=0"), Some("invalid_limit"));
        assert_eq!(code("limit=1001"), Some("invalid_limit"));
        assert_eq!(code("limit=-1"), Some("invalid_limit"));
        assert_eq!(code("limit=ten"), Some("invalid_limit"));
        assert_eq!(code("cursor=%%%"), Some("invalid_cursor"));
        assert_eq!(code("cursor=bm90IGpzb24"), Some("invalid_cursor"));
        assert_eq!(code("offset=5"), Some("invalid_query"));
        let other = Page::<u32> {
            limit: 1,
            after: None,
            list: "letters",
        }
        .split(vec![1, 2], |i| *i)
        .1
        .unwrap();
        assert_eq!(code(&format!("cursor={other}")), Some("invalid_cursor"));
        assert_eq!(code("limit=1000"), None);
        assert_eq!(
            query("").page::<u32>("numbers").unwrap().limit,
            DEFAULT_LIMIT
        );
    }
}
