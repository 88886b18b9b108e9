// x509check reads keyward's certificates with Go's crypto/x509, as every Go
// service, Kubernetes component or SPIRE-based verifier would.
//
//	x509check ROOTS.pem PURPOSE=CHAIN.pem ...
//
// PURPOSE is "client" (verified for id-kp-clientAuth) or "signing" (verified
// for any purpose and required to carry id-kp-documentSigning). CHAIN.pem
// holds the leaf first, then the chain. For each file one JSON line:
// {"file", "subject", "uris", "cmw"}, where cmw is the payload of the leaf's
// id-pe-cmw extension (RFC 9999) decoded independently of keyward, or null.
// Exits non-zero with the reason on the first certificate Go refuses.
package main

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"strings"
)

var (
	idPeCmw             = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 1, 35}
	idKpDocumentSigning = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 36}
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func load(path string) []*x509.Certificate {
	rest, err := os.ReadFile(path)
	if err != nil {
		fail("%s: %v", path, err)
	}
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			fail("Go cannot parse a certificate in %s: %v", path, err)
		}
		out = append(out, cert)
	}
	if len(out) == 0 {
		fail("%s holds no certificate", path)
	}
	return out
}

// cmwPayload returns the JSON payload of the id-pe-cmw extension: a DER
// UTF8String holding ["<media type>", "<base64url payload>"].
func cmwPayload(cert *x509.Certificate) (interface{}, error) {
	for _, ext := range cert.Extensions {
		if !ext.Id.Equal(idPeCmw) {
			continue
		}
		if ext.Critical {
			return nil, fmt.Errorf("id-pe-cmw is marked critical")
		}
		var record string
		rest, err := asn1.UnmarshalWithParams(ext.Value, &record, "utf8")
		if err != nil || len(rest) != 0 {
			return nil, fmt.Errorf("id-pe-cmw is not a UTF8String: %v", err)
		}
		var items []string
		if err := json.Unmarshal([]byte(record), &items); err != nil || len(items) != 2 {
			return nil, fmt.Errorf("not a two-element CMW JSON record: %q", record)
		}
		if !strings.HasPrefix(items[0], "application/") {
			return nil, fmt.Errorf("CMW type %q is not a media type", items[0])
		}
		raw, err := base64.RawURLEncoding.DecodeString(items[1])
		if err != nil {
			return nil, fmt.Errorf("CMW value is not base64url: %v", err)
		}
		var payload interface{}
		if err := json.Unmarshal(raw, &payload); err != nil {
			return nil, fmt.Errorf("CMW payload is not JSON: %v", err)
		}
		return map[string]interface{}{"type": items[0], "payload": payload}, nil
	}
	return nil, nil
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: x509check ROOTS.pem PURPOSE=CHAIN.pem ...")
	}
	roots := x509.NewCertPool()
	for _, root := range load(os.Args[1]) {
		roots.AddCert(root)
	}
	out := json.NewEncoder(os.Stdout)
	for _, arg := range os.Args[2:] {
		purpose, path, ok := strings.Cut(arg, "=")
		if !ok {
			fail("%q is not PURPOSE=FILE", arg)
		}
		chain := load(path)
		intermediates := x509.NewCertPool()
		for _, c := range chain[1:] {
			intermediates.AddCert(c)
		}
		leaf := chain[0]
		options := x509.VerifyOptions{Roots: roots, Intermediates: intermediates}
		switch purpose {
		case "client":
			options.KeyUsages = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		case "signing":
			options.KeyUsages = []x509.ExtKeyUsage{x509.ExtKeyUsageAny}
			found := false
			for _, eku := range leaf.UnknownExtKeyUsage {
				found = found || eku.Equal(idKpDocumentSigning)
			}
			if !found {
				fail("%s: no id-kp-documentSigning", path)
			}
		default:
			fail("unknown purpose %q", purpose)
		}
		if _, err := leaf.Verify(options); err != nil {
			fail("Go does not verify %s for %s: %v", path, purpose, err)
		}
		cmw, err := cmwPayload(leaf)
		if err != nil {
			fail("%s: %v", path, err)
		}
		uris := []string{}
		for _, u := range leaf.URIs {
			uris = append(uris, u.String())
		}
		out.Encode(map[string]interface{}{"file": path, "subject": leaf.Subject.String(), "uris": uris, "cmw": cmw})
	}
}
