"""A local stand-in for the Hugging Face Hub's HTTP API: the calls ``huggingface_hub`` makes to create a model
repository, commit files (regular uploads), describe a revision, list its files and download them. Tests point
``HF_ENDPOINT`` at it; nothing reaches the network."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse


@dataclass
class Repo:
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first
    branches: dict[str, str] = field(default_factory=dict)

    def files(self, revision: str) -> tuple[str, dict[str, bytes]]:
        sha = self.branches.get(revision, revision)
        for commit, files in self.commits:
            if commit == sha:
                return commit, files
        raise HTTPException(404, "Revision Not Found", headers={"X-Error-Code": "RevisionNotFound"})


def standin(token: str) -> tuple[FastAPI, dict[str, Repo]]:
    """The app and its repositories (by id); writes need ``Authorization: Bearer <token>``."""
    app, repos = FastAPI(), {}

    def repo_of(namespace: str, name: str) -> Repo:
        repo = repos.get(f"{namespace}/{name}")
        if repo is None:
            raise HTTPException(404, "Repository Not Found", headers={"X-Error-Code": "RepoNotFound"})
        return repo

    def authorised(request: Request) -> None:
        if request.headers.get("authorization") != f"Bearer {token}":
            raise HTTPException(401, "Invalid credentials")

    @app.post("/api/repos/create")
    async def create(request: Request):
        authorised(request)
        body = await request.json()
        repo_id = f"{body.get('organization') or 'me'}/{body['name']}" if "/" not in body["name"] else body["name"]
        if repo_id in repos:
            return JSONResponse({"error": "You already created this model repo"}, status_code=409)
        repos[repo_id] = Repo()
        return {"url": f"{request.base_url}{repo_id}", "name": repo_id}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        """The model card's front matter must be a YAML mapping (the Hub checks more)."""
        import yaml

        content = (await request.json())["content"]
        try:
            front = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
        except yaml.YAMLError as error:
            return JSONResponse({"error": f"invalid YAML: {error}"}, status_code=400)
        if not isinstance(front, dict):
            return JSONResponse({"error": "the metadata is not a mapping"}, status_code=400)
        return {"errors": [], "warnings": []}

    @app.post("/api/models/{namespace}/{name}/preupload/{revision}")
    async def preupload(namespace: str, name: str, revision: str, request: Request):
        authorised(request)
        repo_of(namespace, name)
        files = (await request.json())["files"]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    @app.post("/api/models/{namespace}/{name}/commit/{revision}")
    async def commit(namespace: str, name: str, revision: str, request: Request):
        authorised(request)
        repo = repo_of(namespace, name)
        files = dict(repo.files(revision)[1]) if repo.commits else {}
        for line in (await request.body()).splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                raise HTTPException(400, f"the stand-in takes regular files only, got {item['key']}")
        sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode())
        sha = hashlib.sha1((sha.hexdigest() + str(len(repo.commits))).encode()).hexdigest()
        repo.commits.append((sha, files))
        repo.branches[revision] = sha
        url = f"{request.base_url}{namespace}/{name}/commit/{sha}"
        return {"commitUrl": url, "commitOid": sha, "pullRequestUrl": None}

    @app.get("/api/models/{namespace}/{name}/revision/{revision:path}")
    async def revision_info(namespace: str, name: str, revision: str):
        sha, files = repo_of(namespace, name).files(revision)
        siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(files.items())]
        return {"id": f"{namespace}/{name}", "modelId": f"{namespace}/{name}", "sha": sha, "siblings": siblings,
                "private": False, "tags": [], "downloads": 0, "likes": 0}  # fmt: skip

    @app.get("/api/models/{namespace}/{name}/tree/{revision}")
    @app.get("/api/models/{namespace}/{name}/tree/{revision}/{path:path}")
    async def tree(namespace: str, name: str, revision: str, path: str = ""):
        _, files = repo_of(namespace, name).files(revision)
        listed = [
            {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for p, data in sorted(files.items())
            if p.startswith(path)
        ]
        return listed

    @app.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    async def resolve(namespace: str, name: str, revision: str, path: str, request: Request):
        sha, files = repo_of(namespace, name).files(revision)
        if path not in files:
            raise HTTPException(404, "Entry not found", headers={"X-Error-Code": "EntryNotFound"})
        data = files[path]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Length": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers)
        return Response(content=data, headers=headers, media_type="application/octet-stream")

    return app, repos
