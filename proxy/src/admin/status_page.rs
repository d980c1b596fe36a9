//! The status page at `/` and its assets under `/assets/`: a page whose scripts read `/health`,
//! `/doctor` and `/metrics` from the same admin server and draw the members, the doctor's
//! verdicts and live charts. Every file is compiled into the binary, so the page works offline
//! and its version always matches the proxy's; the charts use uPlot, vendored from npm
//! (`proxy/assets/vendor/uplot/README.md`).

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::AdminBody;

/// Everything the page may load: its own files, and nothing from elsewhere. uPlot styles its
/// elements through the DOM's style properties, which `style-src 'self'` does not restrict.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One file the page is made of.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: [Asset; 6] = [
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../assets/status/index.html"),
    },
    Asset {
        path: "/assets/status.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/status/status.js"),
    },
    Asset {
        path: "/assets/status.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../assets/status/status.css"),
    },
    Asset {
        path: "/assets/uplot/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/vendor/uplot/uPlot.iife.min.js"),
    },
    Asset {
        path: "/assets/uplot/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../assets/vendor/uplot/uPlot.min.css"),
    },
    Asset {
        path: "/assets/uplot/LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../../assets/vendor/uplot/LICENSE"),
    },
];

/// The page (`/`) or one of its assets (`/assets/...`); 404 for any other path.
pub(super) fn answer(path: &str) -> Response<AdminBody> {
    let Some(asset) = ASSETS.iter().find(|asset| asset.path == path) else {
        let body = format!("not found: {path} is not part of the status page, which is served at /\n");
        return respond(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", Bytes::from(body));
    };
    respond(StatusCode::OK, asset.content_type, Bytes::from_static(asset.body))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<AdminBody> {
    let whole = Full::new(body).map_err(|never: Infallible| match never {});
    let mut response = Response::new(whole.boxed_unsync());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files are small and change with the binary: revalidating costs little, and a stale
    // script after an upgrade would misread the new binary's answers.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(response: &Response<AdminBody>, name: header::HeaderName) -> &str {
        response.headers().get(name).and_then(|value| value.to_str().ok()).unwrap_or_default()
    }

    #[test]
    fn every_asset_is_served_with_its_content_type() {
        for asset in &ASSETS {
            let response = answer(asset.path);
            assert_eq!(response.status(), StatusCode::OK, "{}", asset.path);
            assert_eq!(header(&response, header::CONTENT_TYPE), asset.content_type, "{}", asset.path);
            assert_eq!(header(&response, header::CACHE_CONTROL), "no-cache", "{}", asset.path);
            assert!(header(&response, header::CONTENT_SECURITY_POLICY).starts_with("default-src 'none'"));
            assert!(!asset.body.is_empty(), "{} is empty", asset.path);
        }
    }

    #[test]
    fn the_page_references_only_assets_that_are_served() {
        let page = std::str::from_utf8(ASSETS[0].body).unwrap();
        let mut referenced = 0;
        for attribute in ["src=\"", "href=\""] {
            for (at, _) in page.match_indices(attribute) {
                let target = page[at + attribute.len()..].split('"').next().unwrap();
                let path = format!("/{target}");
                assert!(ASSETS.iter().any(|asset| asset.path == path), "{target} is not served");
                referenced += 1;
            }
        }
        assert!(referenced >= 4, "the page references {referenced} assets");
    }

    #[test]
    fn unknown_assets_are_not_found() {
        for path in ["/assets/", "/assets/missing.js", "/assets/uplot/", "/index.html", "/assets/../metrics"] {
            assert_eq!(answer(path).status(), StatusCode::NOT_FOUND, "{path}");
        }
    }
}
